"""torchrun-based distributed setup with a single-process fallback.

`torchrun --nproc_per_node N script.py` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the
script runs as one process. nccl on CUDA, gloo on CPU. Evaluation gathers (sample index, outputs)
from every rank and drops the duplicates that DistributedSampler pads in, so metrics count every
sample exactly once.
"""
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self):
        return self.rank == 0


def _pick_device(device, local_rank):
    if device in ("", "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def setup(device="auto"):
    """Initialise the process group from torchrun's env vars (or not at all) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, local_rank, dev, distributed)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _initialized():
    return dist.is_available() and dist.is_initialized()


def is_main():
    return not _initialized() or dist.get_rank() == 0


def world_size():
    return dist.get_world_size() if _initialized() else 1


def barrier():
    if _initialized():
        dist.barrier()


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id):
    # torch seeds each worker as base_seed + worker_id; derive python/numpy from it. Samples are
    # reseeded from (seed, epoch, index) by _EpochSeeded, so this only covers code outside them.
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


class _EpochSampler(Sampler):
    """Yields (index, epoch): a persistent worker learns the epoch of every sample it loads.
    `generator` (shuffling, single process) is reseeded by `set_epoch`."""

    def __init__(self, sampler, generator):
        self.sampler, self.generator, self.epoch = sampler, generator, 0

    def __iter__(self):
        if self.generator is not None:
            # the draw a DataLoader iterator makes for its workers' base seed from the shuffle generator:
            # kept so that the order equals that of a loader without workers (and of earlier versions)
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        epoch = self.epoch
        return ((i, epoch) for i in self.sampler)

    def __len__(self):
        return len(self.sampler)


class _EpochSeeded(Dataset):
    """Worker-side wrapper: before each sample, sets the dataset's `epoch` attribute (if it has one;
    the main process's copy is not seen by persistent workers) and seeds python/numpy/torch from
    (seed, epoch, index). A sample's randomness then depends on nothing else: not on the worker
    that loads it, the number of workers, or an interruption and resume."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        if hasattr(self.dataset, "epoch"):
            self.dataset.epoch = epoch
        s = np.random.SeedSequence([self.seed, epoch, index]).generate_state(2)
        random.seed(int(s[0]))
        np.random.seed(int(s[0]))
        torch.manual_seed((int(s[0]) << 32) | int(s[1]))
        return self.dataset[index]


def make_loader(dataset, batch_size, *, shuffle, workers=0, seed=0, drop_last=False, collate_fn=None,
                prefetch_factor=4, persistent_workers=None, pin_memory=None):
    """DataLoader with a DistributedSampler when running under torchrun, seeded shuffling otherwise.

    The order depends only on `seed` and the epoch passed to `set_epoch`, so a resumed run sees
    the same batches as an uninterrupted one (and the same with any number of workers).
    With workers > 0: `prefetch_factor` batches queued per worker; persistent workers (they keep
    per-worker caches such as the video index; `persistent_workers` None = for shuffled, i.e.
    training, loaders only, so that evaluation loaders hold no idle processes); and every sample
    seeded from (seed, epoch, index) in the worker (see _EpochSeeded), which keeps resume bit-exact
    with persistent workers. `pin_memory` None = when CUDA is available.
    """
    if _initialized():
        sampler = DistributedSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(),
                                     shuffle=shuffle, seed=seed, drop_last=drop_last)
        gen = None
    else:
        sampler = None
        gen = torch.Generator()
        gen.manual_seed(seed)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if workers == 0:  # in-process: the dataset itself, the main process's RNG
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=(shuffle and sampler is None), sampler=sampler,
                            num_workers=0, drop_last=drop_last, collate_fn=collate_fn, generator=gen,
                            pin_memory=pin_memory)
    else:
        if sampler is None:
            sampler = RandomSampler(dataset, generator=gen) if shuffle else SequentialSampler(dataset)
        worker_gen = torch.Generator()  # the workers' base seeds: never from the global RNG
        worker_gen.manual_seed(seed)
        loader = DataLoader(_EpochSeeded(dataset, seed), batch_size=batch_size, sampler=_EpochSampler(sampler, gen),
                            num_workers=workers, drop_last=drop_last, collate_fn=collate_fn, generator=worker_gen,
                            worker_init_fn=_worker_init,
                            persistent_workers=shuffle if persistent_workers is None else persistent_workers,
                            prefetch_factor=prefetch_factor, pin_memory=pin_memory)
    loader.base_seed = seed
    return loader


def set_epoch(loader, epoch):
    """Make the epoch's shuffle (and, with workers, the samples' seeds) a function of (seed, epoch)."""
    sampler = loader.sampler
    if isinstance(sampler, _EpochSampler):
        sampler.epoch = epoch
        gen, sampler = sampler.generator, sampler.sampler
    else:
        gen = loader.generator
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif gen is not None:
        gen.manual_seed(getattr(loader, "base_seed", 0) * 100003 + epoch)


def gather_eval(indices, *tensors):
    """Gather per-sample eval outputs from all ranks; dedupe padded samples by index; sort by index.

    `indices` (N,) int64 are dataset indices; each tensor has N rows. Returns (indices, *tensors) on
    CPU, identical on every rank.
    """
    indices = indices.detach().cpu().long()
    tensors = [t.detach().cpu() for t in tensors]
    if _initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (indices, tensors))
        indices = torch.cat([g[0] for g in gathered])
        tensors = [torch.cat([g[1][i] for g in gathered]) for i in range(len(tensors))]
    order = torch.argsort(indices, stable=True)
    indices = indices[order]
    keep = torch.ones_like(indices, dtype=torch.bool)
    keep[1:] = indices[1:] != indices[:-1]
    return (indices[keep], *[t[order][keep] for t in tensors])


def all_reduce_mean(value):
    """Mean of a scalar over ranks (for logging losses)."""
    t = torch.as_tensor(float(value), dtype=torch.float64)
    if _initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return float(t.item())


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (for saving state dicts)."""
    return model.module if hasattr(model, "module") else model


def broadcast_buffers(model, src=0):
    """Copy rank `src`'s buffers (BatchNorm running statistics) to every rank, in place. With
    DDP(broadcast_buffers=False) each rank's BN statistics drift apart; call this before evaluating
    or saving, so that every rank evaluates the model that rank 0 saves. No-op on one process."""
    if not (_initialized() and dist.get_world_size() > 1):
        return
    for buf in unwrap(model).buffers():
        dist.broadcast(buf.data, src)
