"""Classification metrics on torch tensors. Accuracies are fractions in [0, 1]."""
import torch


def _check(scores, labels):
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {tuple(scores.shape)}")
    if labels.ndim != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(f"labels must be (N,) with N = {scores.shape[0]}, got shape {tuple(labels.shape)}")


def topk_accuracy(scores, labels, ks=(1, 5)):
    """{k: fraction of rows whose label is among the k highest scores}; k is capped at C."""
    scores, labels = torch.as_tensor(scores), torch.as_tensor(labels).long()
    _check(scores, labels)
    if scores.shape[0] == 0:
        return {k: float("nan") for k in ks}
    out = {}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[k] = (top == labels[:, None]).any(dim=1).float().mean().item()
    return out


def confusion_matrix(pred, labels, num_classes):
    """cm[true, pred] counts."""
    pred, labels = torch.as_tensor(pred).long(), torch.as_tensor(labels).long()
    idx = labels * num_classes + pred
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(pred, labels, num_classes):
    """Recall of each class; nan for a class with no samples."""
    cm = confusion_matrix(pred, labels, num_classes).double()
    support = cm.sum(dim=1)
    acc = cm.diag() / support
    acc[support == 0] = float("nan")
    return acc


def mean_class_accuracy(pred, labels, num_classes):
    """Mean of per-class recall over the classes present in `labels`."""
    acc = per_class_accuracy(pred, labels, num_classes)
    acc = acc[~torch.isnan(acc)]
    return acc.mean().item() if acc.numel() else float("nan")


def average_precision(scores, positives):
    """AP of one class: mean over positives of the precision at their rank (ties broken by order)."""
    order = torch.argsort(scores, descending=True, stable=True)
    pos = positives[order].double()
    n_pos = pos.sum()
    if n_pos == 0:
        return float("nan")
    precision = pos.cumsum(0) / torch.arange(1, len(pos) + 1, dtype=torch.float64)
    return (precision * pos).sum().item() / n_pos.item()


def mean_average_precision(scores, labels, num_classes=None):
    """One-vs-rest AP per class, averaged over classes that have at least one positive."""
    scores, labels = torch.as_tensor(scores).double(), torch.as_tensor(labels).long()
    _check(scores, labels)
    num_classes = num_classes or scores.shape[1]
    aps = [average_precision(scores[:, c], labels == c) for c in range(num_classes)]
    aps = [a for a in aps if a == a]
    return sum(aps) / len(aps) if aps else float("nan")


def average_views(scores, ids):
    """Multi-view / multi-clip testing: mean of the rows of `scores` that share an id.

    Returns (averaged scores (U, C), unique ids (U,)) with ids sorted ascending.
    """
    scores, ids = torch.as_tensor(scores), torch.as_tensor(ids).long()
    uniq, inv = torch.unique(ids, sorted=True, return_inverse=True)
    summed = torch.zeros(len(uniq), scores.shape[1], dtype=torch.float64).index_add_(0, inv, scores.double())
    counts = torch.bincount(inv, minlength=len(uniq)).double()
    return (summed / counts[:, None]).to(scores.dtype if scores.is_floating_point() else torch.float64), uniq
