"""One training on several processes (DistributedDataParallel): the choices, each in one place.

A run with ``nproc`` N > 1 is launched by ``engine.training.launch`` (torchrun); each process (a
*rank*) runs the same ``fit`` with a ``Ranks``. What differs from one process, and why:

- **Batches.** The user's batch size is the effective batch of one optimizer step, across all ranks:
  each rank takes ``batch_size / N`` (it must divide). The epoch's order is the one-process draw
  (the same seeded generator), rank r taking every N-th index (``ShardSampler``), so rank r's
  batch i is its share of the one-process batch i and DDP's gradient average steps on the same
  images one process would. Dropout and augmentation draw per rank.
- **Validation** runs on every rank over its shard (images r, r+N, ...) and the sums are
  all-reduced (loss, confusion matrix): the numbers are the one-process definition, not a mean of means.
- **Feature cache** (frozen backbone): each rank computes the features of its shard once, they are
  gathered back into the one-process order on every rank, and the head trains under DDP.
- **Gradual unfreezing** rebuilds the DDP wrapper when parameters join (DDP registers the
  parameters that need gradients when it is built); the rebuild broadcasts rank 0's weights once.
  Keeping frozen parameters registered with a zero LR would compute and all-reduce their gradients
  for nothing.
- **BatchNorm**: the plan's BN policy holds per rank; trainable BN normalises each rank's share of
  the batch (as micro-batches do, engine/training/micro.py) unless ``sync_bn``, which only CUDA
  has (torch's SyncBatchNorm refuses CPU tensors).
- **Before each validation** rank 0's BatchNorm statistics are broadcast: the weights every rank
  holds are then the checkpoint's, buffers included.
- **Only rank 0 writes** (run folder, metrics, checkpoints, TensorBoard); a cancel is rank 0's,
  agreed by all ranks at each step.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from engine.core.errors import EngineError
from engine.training.epoch import EvalScores
from engine.training.metrics import balanced_scores

if TYPE_CHECKING:
    from engine.config import TrainConfig


@dataclass(frozen=True)
class Ranks:
    """This process's place in a distributed training (torchrun's environment variables)."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collective tensors live: NCCL reduces on the GPU, gloo on the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over all ranks (float64, so counts stay exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over all ranks, in place."""
        dist.all_reduce(t)
        return t

    def describe(self, device: torch.device, batches: str, batch_size: int) -> tuple[str, str]:
        """The run's device and batch lines, saying how the work is shared."""
        return (f"{self.world} processes ({self.backend}) on {device.type}",
                f"batch {batch_size} per step = {self.world} processes x {batch_size // self.world}: each {batches}")

    def check_in_step(self, module: nn.Module) -> None:
        """Every rank holds the same weights (what DDP promises, checked once an epoch: a parameter it
        did not reduce, e.g. one unfrozen without rebuilding the wrapper, would drift apart)."""
        with torch.no_grad():
            total = sum((p.detach().double().sum() * (i + 1) for i, p in enumerate(module.parameters())),
                        torch.zeros((), dtype=torch.float64, device=next(module.parameters()).device))
        sums = self.gather(float(total))
        if max(sums) - min(sums) > 1e-9 * max(1.0, abs(sums[0])):
            raise RuntimeError(f"the {self.world} processes' weights drifted apart (checksums {sums})")

    def share_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm's running statistics) on every rank, before an evaluation. Each
        rank's last step updated its own from its share of the batch, and DDP broadcasts them only
        before the next training forward: rank 1 validated with other statistics than the checkpoint
        (rank 0's) holds, and the run's val_loss differed from an evaluation of it (0.3045 vs 0.3023)."""
        with torch.no_grad():
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one."""
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def agreed(self, stop: Callable[[], bool]) -> Callable[[], bool]:
        """A stop every rank sees at the same step (rank 0 reads the cancel; the others follow)."""
        return lambda: self.any(bool(stop()) if self.main else False)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.comm_device)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def start_ranks(device: str) -> Ranks:
    """Join the process group torchrun set up: NCCL when this run trains on CUDA, gloo on CPU.

    On CPU the machine's cores are shared out (torchrun would leave every rank one thread)."""
    env = os.environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank, local_world = int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world))
    from engine.core.device import resolve_device

    on_cuda = resolve_device(device).type == "cuda"
    if on_cuda:
        torch.cuda.set_device(local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    backend = "nccl" if on_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Ranks(rank, world, local_rank, local_world, backend)


def join_ranks(device: str, local_rank: int, local_world: int, threads: int | None = None) -> Ranks:
    """This process's place in a process group that someone else initialised (Ray Train's
    TorchTrainer does, with its own backend and rendezvous): the group's rank, size and backend are
    read from it, never re-initialised. ``threads``: the CPU threads this process was given."""
    from engine.core.device import resolve_device

    if not dist.is_initialized():
        raise RuntimeError("join_ranks needs an initialised torch.distributed process group")
    if resolve_device(device).type == "cuda":
        torch.cuda.set_device(local_rank)
    else:
        torch.set_num_threads(max(1, threads or (os.cpu_count() or 1) // max(1, local_world)))
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, local_world, str(dist.get_backend()))


def stop_ranks() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_distributed(config: TrainConfig, device: torch.device, here: int | None = None) -> None:
    """What N processes need, refused before any of them starts. ``here``: how many of them run on
    this machine (default ``config.nproc``; torchrun's LOCAL_WORLD_SIZE on several machines)."""
    n = config.nproc if here is None else here
    if n < 2 and not config.sync_bn:
        return
    if device.type == "cuda":
        have = torch.cuda.device_count()
        if n > have:
            raise EngineError(f"{n} processes were asked for but this machine has {have} CUDA GPU(s): "
                              "one process per GPU.")
    elif device.type != "cpu":
        raise EngineError(f"Training on several processes needs CUDA GPUs or the CPU, not {device.type}.")
    elif n > (os.cpu_count() or 1):
        raise EngineError(f"{n} processes were asked for but this machine has {os.cpu_count()} CPU cores: "
                          "each process needs at least one.")
    if config.sync_bn and device.type != "cuda":
        raise EngineError("Synchronised BatchNorm (--sync-bn) needs CUDA GPUs: torch's SyncBatchNorm does not "
                          "run on the CPU. Without it each process normalises its own share of the batch.")


class ShardSampler(Sampler[int]):
    """Rank ``rank``'s share of ``base``'s draw: every ``world``-th index, padded as
    DistributedSampler pads (from the start of the draw) so every rank takes the same number of
    steps. ``base`` draws from the run's per-epoch seeded generator, so all ranks draw the same order."""

    def __init__(self, base: Sampler[int], rank: int, world: int):
        self.base, self.rank, self.world = base, rank, world

    def __len__(self) -> int:
        return math.ceil(len(self.base) / self.world)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        drawn = list(self.base)
        total = len(self) * self.world
        while len(drawn) < total:
            drawn += drawn[: total - len(drawn)]
        return iter(drawn[self.rank:total:self.world])


def shard(dataset: Dataset, ranks: Ranks) -> Subset:
    """Rank r's images r, r+N, ... (unpadded: evaluation and the feature cache count each image once)."""
    return Subset(dataset, range(ranks.rank, len(dataset), ranks.world))  # type: ignore[arg-type]


def interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """Shards r, r+N, ... put back into one tensor in the original order."""
    world, total = len(parts), sum(p.shape[0] for p in parts)
    out = parts[0].new_empty((total, *parts[0].shape[1:]))
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def shared_features(compute: Callable[[DataLoader], tuple[torch.Tensor, torch.Tensor] | None],
                    dataset: Dataset, loader_kw: dict[str, Any], ranks: Ranks
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The feature cache of ``dataset``, each rank computing its shard once, gathered on every
    rank in the one-process order; None on every rank when one was cancelled."""
    mine = compute(DataLoader(shard(dataset, ranks), **loader_kw))
    if ranks.any(mine is None):
        return None
    assert mine is not None
    parts = ranks.gather(mine)
    return interleave([p[0] for p in parts]), interleave([p[1] for p in parts])


def combine_scores(scores: EvalScores, num_classes: int, ranks: Ranks) -> EvalScores:
    """Every rank's evaluation of its shard, summed into the scores of the whole split."""
    confusion = (torch.tensor(scores.confusion, dtype=torch.float64) if scores.confusion
                 else torch.zeros(num_classes, num_classes, dtype=torch.float64))
    seen = confusion.sum().item()
    summed = ranks.sum([scores.loss * seen, *confusion.flatten().tolist()])
    total = torch.tensor(summed[1:], dtype=torch.float64).reshape(num_classes, num_classes)
    images = total.sum().item()
    if images == 0:
        return EvalScores(0.0, 0.0, 0.0, 0.0, [])
    macro_f1, balanced_acc = balanced_scores(total)
    return EvalScores(summed[0] / images, total.diagonal().sum().item() / images, macro_f1, balanced_acc,
                      total.long().tolist())


def wrap(model: nn.Module, ranks: Ranks) -> nn.Module:
    """The DDP wrapper of what trains, over the parameters that need gradients now."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [ranks.local_rank] if ranks.backend == "nccl" else None
    return DistributedDataParallel(model, device_ids=ids)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """BatchNorm layers (timm's BN+activation fusions too) as SyncBatchNorm; same state_dict keys, so
    checkpoints load into the plain model."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(module)
