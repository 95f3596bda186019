"""Run by test_common.py as one process and under torchrun with 2 gloo processes: trains a tiny
model with DDP for 2 epochs and evaluates with gather_eval; rank 0 writes the outcome as JSON."""
import json
import sys

import torch
import torch.nn as nn

from common import dist


def main(out_path):
    env = dist.setup("cpu")
    dist.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=g)
    y = (x.sum(1) > 0).long()
    train = torch.utils.data.TensorDataset(x, y)
    xe = torch.randn(31, 5, generator=g)  # odd size: DistributedSampler pads one duplicate
    test = torch.utils.data.TensorDataset(xe, (xe.sum(1) > 0).long(), torch.arange(31))
    model = nn.Linear(5, 2)
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    # global batch 8 either way: 8 on one process, 4 per rank on two (interleaved by the sampler)
    loader = dist.make_loader(train, 8 // env.world_size, shuffle=False)
    losses = []
    for epoch in range(2):
        dist.set_epoch(loader, epoch)
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(dist.all_reduce_mean(loss.item()))
    idx_all, pred_all, lab_all = [], [], []
    with torch.no_grad():
        for xb, yb, ib in dist.make_loader(test, 4, shuffle=False):
            idx_all.append(ib)
            pred_all.append(model(xb).argmax(1))
            lab_all.append(yb)
    idx, pred, lab = dist.gather_eval(torch.cat(idx_all), torch.cat(pred_all), torch.cat(lab_all))
    if env.is_main:
        w = dist.unwrap(model).weight.detach().flatten().tolist()
        json.dump({"world_size": env.world_size, "n_eval": len(idx), "eval_indices": idx.tolist(),
                   "acc": (pred == lab).float().mean().item(), "weights": w, "loss": sum(losses) / len(losses)},
                  open(out_path, "w"))
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
