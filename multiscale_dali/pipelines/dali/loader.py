"""The DALI loader: one pipeline for the whole run, iterated epoch by epoch, with exact resume.

Exact resume: training pipelines are built with ``enable_checkpointing=True``. A DALI checkpoint
holds the reader's position and shuffle state, every operator's RNG state and the pipeline's
iteration counter (the ``BatchInfo.iteration`` the size callback reads), so a pipeline rebuilt from the
same graph and restored from it replays the remaining batches bit for bit, mid-epoch or at an epoch
end (measured on DALI 2.4 CPU; ``tests/test_loader_resume.py`` holds it to that).

Padding: the reader reads positions in the padded sample list, not labels; a position at or past
``len(spec.files)`` is a padded duplicate, which the batch's ``valid`` mask leaves out of metrics.
On a pack's shards the reader yields the labels themselves and pads each rank's block after its
last real sample, so the position inside the epoch tells padding apart (``shards.valid_samples``).
Blocks differ in size by one, and DALI's iterator trims a padded tail by the sizes it expects per
block (an all-padding batch came out empty, and with DROP the unread padding of one epoch came out
as the first batch of the next): so shard batches are read with FILL, always whole, and the loader
cuts each rank's epoch to ``spec.shard_size`` samples itself, as the folder path's padded list does.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from nvidia.dali import __version__ as DALI_VERSION
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from multiscale_dali.constants import Backend
from multiscale_dali.data.shard_format import ShardError
from multiscale_dali.errors import OutOfMemoryError, out_of_memory_reason
from multiscale_dali.pipelines.batch import MultiScaleBatch, to_model_batch
from multiscale_dali.pipelines.dali.graph import (
    LABELS_SLOT,
    READER_NAME,
    graph_for,
    iterations_per_epoch,
    pipeline_batch_size,
    scale_slot,
)
from multiscale_dali.pipelines.dali.pipeline import multiscale_pipeline
from multiscale_dali.pipelines.dali.shards import valid_samples
from multiscale_dali.pipelines.sampling import (
    AUGMENT_STREAM,
    check_loader_state,
    derived_seed,
    loader_state,
    padded_sample_order,
    shard_padding_mask,
)
from multiscale_dali.pipelines.spec import DataReadError, LoaderSpec

log = logging.getLogger(__name__)


def _damaged_pack(spec: LoaderSpec, what: str) -> ShardError:
    """The error for a split DALI cannot use: the pack's own check of the split names the shard and key.

    DALI names neither, and the pack passed its cheap check at start, so a shard changed since (or
    was damaged inside, where only a full read tells). Verifying the split reads all of it, once,
    on this error path only.
    """
    from multiscale_dali.data.shard_verify import verify_shards

    source = spec.shards
    try:
        verify_shards(source.manifest, deep=True, splits=[source.split])
    except ShardError as err:
        return err
    directory = source.manifest.directory
    return ShardError(f"split {source.split} of {directory}: {what}, yet the split verifies; "
                      f"`msdali scan --data {directory}` checks the whole pack")


def _last_batch_policy(spec: LoaderSpec) -> LastBatchPolicy:
    if spec.shards is not None:
        return LastBatchPolicy.FILL  # see the module docstring
    # LoaderSpec keeps a lone partial batch even with drop_last (steps_per_epoch is then 1); DROP
    # would yield nothing and DALI would refuse to start.
    drops = spec.drop_last and spec.shard_size >= spec.batch_size
    return LastBatchPolicy.DROP if drops else LastBatchPolicy.PARTIAL


def _dali_reason(err: RuntimeError) -> str:
    """DALI's multi-line error in one line: the operator that failed and what it encountered (the
    graph's own traceback and the "pipeline no longer valid" lines left out)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    operator = next((line.split("`")[1] for line in lines if line.startswith("Error in ") and line.count("`") >= 2),
                    None)
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    said = [line for line in lines if not line.startswith(("Current pipeline object", "C++ context",
                                                           "Critical error in pipeline"))]
    reason = "; ".join(dict.fromkeys(said)) or repr(err)
    return f"{operator}: {reason}" if operator else reason


def _dali_error(err: RuntimeError, spec: LoaderSpec, epoch: int) -> Exception:
    """DALI's multi-line error as one line: out of memory, a damaged pack, or the file it could not read."""
    log.debug("DALI error in epoch %d: %s", epoch, err)
    if spec.shards is not None and out_of_memory_reason(err) is None:
        return _damaged_pack(spec, f"DALI cannot read it in epoch {epoch} (DALI said: {_dali_reason(err)})")
    where = f"in epoch {epoch} (shard {spec.shard_id}/{spec.num_shards}, {len(spec.files)} files)"
    memory = out_of_memory_reason(err)
    if memory is not None:
        # The same bad_alloc a huge image would cause: say which sizes asked for the memory.
        return OutOfMemoryError(f"DALI ran out of memory {where} with batches of {pipeline_batch_size(spec)} "
                                f"images at up to {max(spec.schedule.all_scales)} px: {memory}")
    return DataReadError(f"DALI could not read or decode an image {where}. DALI said: {_dali_reason(err)}")


def _build_pipeline(spec: LoaderSpec, *, first_epoch: int, checkpoint: bytes | None) -> Pipeline:
    """The multi-scale pipeline of ``spec`` seeded from ``(seed, first_epoch)``, restored from ``checkpoint``."""
    graph = graph_for(spec, first_epoch=first_epoch)
    return multiscale_pipeline(
        graph,
        batch_size=pipeline_batch_size(spec),
        num_threads=max(1, spec.num_workers),
        device_id=graph.placement.device_id,
        seed=derived_seed(spec.seed, first_epoch, stream=AUGMENT_STREAM),
        # Only training needs it: eval replays without state, and checkpointing has a cost.
        enable_checkpointing=spec.train,
        enable_conditionals=graph.needs_conditionals,
        checkpoint=checkpoint,
    )


def _iterator(pipeline: Pipeline, spec: LoaderSpec, *, first_epoch: int) -> DALIGenericIterator:
    names = [scale_slot(i) for i in range(spec.schedule.num_scales)] + [LABELS_SLOT]
    try:
        iterator = DALIGenericIterator(
            pipeline,
            names,
            reader_name=READER_NAME,
            last_batch_policy=_last_batch_policy(spec),
            auto_reset=True,
        )
    except RuntimeError as err:
        raise _dali_error(err, spec, first_epoch) from err
    if len(iterator) != dali_batches(spec):
        raise RuntimeError(
            f"DALI iterator yields {len(iterator)} batches per epoch but the spec expects "
            f"{dali_batches(spec)} (shard_size={spec.shard_size}, batch_size={spec.batch_size})"
        )
    return iterator


def dali_batches(spec: LoaderSpec) -> int:
    """Batches the DALI iterator yields per epoch: the spec's, or on shards every batch the reader
    runs (FILL), of which a dropped last one is read and discarded by the loader."""
    return spec.steps_per_epoch if spec.shards is None else iterations_per_epoch(spec)


# ---------------------------------------------------------------------------------------- resume state
@dataclass(frozen=True)
class _Resume:
    """A loaded state, held until the first :meth:`DaliLoader.epoch` call builds the pipeline."""

    epoch: int
    step: int
    first_epoch: int
    checkpoint: bytes | None  # None for eval pipelines, which are built without checkpointing


def _dali_state(first_epoch: int, checkpoints: Sequence[bytes]) -> dict[str, Any]:
    # base64 text: the state must be plain data that JSON and torch.load(weights_only=True) both take.
    return {
        "version": DALI_VERSION,
        "first_epoch": first_epoch,
        "checkpoints": [base64.b64encode(c).decode("ascii") for c in checkpoints],
    }


def _parse_dali_state(state: Mapping[str, Any], spec: LoaderSpec) -> tuple[int, bytes | None]:
    """``(first_epoch, checkpoint)`` from the ``"dali"`` part of a state; ``ValueError`` if malformed."""
    dali = state.get("dali")
    if not isinstance(dali, Mapping):
        raise ValueError("loader state has no 'dali' section")
    first_epoch, encoded = dali.get("first_epoch"), dali.get("checkpoints")
    if not isinstance(first_epoch, int) or first_epoch < 0 or not isinstance(encoded, list):
        raise ValueError(f"malformed 'dali' section: first_epoch={first_epoch!r}, checkpoints={type(encoded).__name__}")
    expected = 1 if spec.train else 0  # one pipeline per loader; eval pipelines keep no checkpoint
    if len(encoded) != expected:
        raise ValueError(f"loader state holds {len(encoded)} DALI checkpoints, this loader needs {expected}")
    if dali.get("version") != DALI_VERSION:
        # DALI rejects a checkpoint whose format changed; a readable one from another release may
        # still draw other random numbers, so the resume would be valid but not bit-exact.
        log.warning("DALI checkpoint from DALI %s restored by DALI %s", dali.get("version"), DALI_VERSION)
    try:
        checkpoint = base64.b64decode(encoded[0], validate=True) if encoded else None
    except (binascii.Error, TypeError) as err:
        raise ValueError(f"DALI checkpoint in the loader state is not base64 text: {err}") from err
    return first_epoch, checkpoint


# ---------------------------------------------------------------------------------------- the loader
class DaliLoader:
    """:class:`~multiscale_dali.pipelines.spec.Loader` backed by one DALI pipeline for the whole run.

    The pipeline is built on the first :meth:`epoch` call, with its shuffle and augmentation seeds
    derived from ``(seed, first epoch)``. Exact resume goes through :meth:`state_dict` and
    :meth:`load_state_dict`: a training pipeline is rebuilt from the same first epoch and restored from
    its DALI checkpoint, so it continues with the very batches the interrupted run would have seen.
    Without a loaded state, a run that starts at epoch ``e`` gets a fresh, reproducible order seeded
    from ``(seed, e)``, not the order an uninterrupted run would have used.
    """

    # The plain string: it goes into loader states, which torch.load(weights_only=True) must read.
    backend = Backend.DALI.value

    def __init__(self, spec: LoaderSpec) -> None:
        self.spec = spec
        order = padded_sample_order(len(spec.files), spec.num_shards) if spec.shards is None else []
        self._padded_labels = torch.tensor(list(map(spec.labels.__getitem__, order)), dtype=torch.int64)
        self._iterator: DALIGenericIterator | None = None
        self._pipeline: Pipeline | None = None
        self._first_epoch: int | None = None
        self._next_epoch: int | None = None
        self._epoch_finished = True
        self._position: tuple[int, int] | None = None  # (epoch, batches of it consumed)
        self._resume: _Resume | None = None
        self._closed = False

    def __len__(self) -> int:
        return self.spec.steps_per_epoch

    def epoch(self, epoch: int) -> Iterator[MultiScaleBatch]:
        """Validate the order and build or advance the pipeline now; yield the batches lazily."""
        iterator, first_step = self._iterator_for(epoch)
        self._next_epoch = epoch + 1
        # A resumed epoch whose last batch was consumed before the save has nothing left to yield.
        self._epoch_finished = first_step == self.spec.steps_per_epoch
        self._position = (epoch, first_step)
        return self._batches(iterator, epoch, first_step)

    def state_dict(self) -> dict[str, Any]:
        """Position after the batches consumed so far, with the DALI checkpoint of that position.

        ``{"backend", "epoch", "step", "spec", "dali": {"version", "first_epoch", "checkpoints"}}``;
        eval loaders store no checkpoint (their epochs replay without one).
        """
        self._check_open()
        if self._iterator is None:
            if self._resume is None:
                raise RuntimeError("no epoch has been started, so there is no position to save")
            resume = self._resume
            checkpoints = [resume.checkpoint] if resume.checkpoint is not None else []
            state = loader_state(self.backend, self.spec, resume.epoch, resume.step)
            return state | {"dali": _dali_state(resume.first_epoch, checkpoints)}
        # checkpoints() describes what the consumer has taken, however far DALI has prefetched.
        checkpoints = self._iterator.checkpoints() if self.spec.train else []
        state = loader_state(self.backend, self.spec, *self._position)
        return state | {"dali": _dali_state(self._first_epoch, checkpoints)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next ``epoch(e)`` of the state's epoch yield only its unconsumed batches."""
        self._check_open()
        if self._iterator is not None:
            raise RuntimeError("load_state_dict must be called before the first epoch()")
        epoch, step = check_loader_state(state, self.spec, backend=self.backend)
        first_epoch, checkpoint = _parse_dali_state(state, self.spec)
        if first_epoch > epoch:
            raise ValueError(f"loader state built its pipeline at epoch {first_epoch}, after its epoch {epoch}")
        self._resume = _Resume(epoch=epoch, step=step, first_epoch=first_epoch, checkpoint=checkpoint)

    def close(self) -> None:
        # Dropping the iterator and pipeline frees DALI's threads and buffers; DALI has no other close.
        self._iterator = None
        self._pipeline = None
        self._next_epoch = None
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this DaliLoader is closed")

    def _iterator_for(self, epoch: int) -> tuple[DALIGenericIterator, int]:
        """The iterator positioned for ``epoch`` and the step it is at (> 0 only when resuming)."""
        self._check_open()
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self._iterator is None and self._resume is not None:
            return self._restore(epoch)
        if self._iterator is None:
            self._build(first_epoch=epoch)
            return self._iterator, 0
        if epoch < self._next_epoch:
            raise ValueError(
                f"DALI epochs run forwards: epoch {epoch} asked for after epoch {self._next_epoch - 1}"
            )
        if epoch > self._next_epoch and not self.spec.schedule.is_constant:
            raise ValueError(
                f"epoch {epoch} asked for after epoch {self._next_epoch - 1}: a progressive DALI "
                f"pipeline keys its sizes on consecutive epochs; close() and build a new loader to jump"
            )
        if not self._epoch_finished:
            self._drain()
        return self._iterator, 0

    def _restore(self, epoch: int) -> tuple[DALIGenericIterator, int]:
        resume = self._resume
        if epoch < resume.epoch:
            raise ValueError(f"the loaded state resumes at epoch {resume.epoch}, epoch {epoch} was asked for")
        self._resume = None
        if resume.checkpoint is None:
            # Eval epochs do not depend on history (file order, fixed shard, no random draws), so a
            # pipeline built at the asked epoch is the one the interrupted run had; only a partly
            # consumed epoch needs its first batches decoded again and dropped.
            self._build(first_epoch=epoch)
            if epoch != resume.epoch:
                return self._iterator, 0
            self._skip(epoch, resume.step)
            return self._iterator, resume.step
        # The same first epoch gives the same graph and seeds, which DALI needs to honour a checkpoint.
        self._build(first_epoch=resume.first_epoch, checkpoint=resume.checkpoint)
        self._next_epoch = resume.epoch + 1
        self._epoch_finished = resume.step == self.spec.steps_per_epoch
        if epoch == resume.epoch:
            return self._iterator, resume.step
        return self._iterator_for(epoch)  # the ordinary forward rules, from the restored position

    def _build(self, *, first_epoch: int, checkpoint: bytes | None = None) -> None:
        if checkpoint is not None:
            log.info("DALI loader restores its checkpoint (pipeline first built at epoch %d)", first_epoch)
        elif first_epoch and self.spec.train:
            log.info("DALI loader starts at epoch %d with seeds derived from it", first_epoch)
        self._first_epoch = first_epoch
        self._pipeline = _build_pipeline(self.spec, first_epoch=first_epoch, checkpoint=checkpoint)
        self._iterator = _iterator(self._pipeline, self.spec, first_epoch=first_epoch)

    def _drain(self) -> None:
        """Consume what is left of an abandoned epoch so the next one starts on its first batch."""
        log.debug("draining the unconsumed rest of DALI epoch %d", self._next_epoch - 1)
        try:
            for _ in self._iterator:
                pass
        except RuntimeError as err:
            raise _dali_error(err, self.spec, self._next_epoch - 1) from err
        self._epoch_finished = True

    def _skip(self, epoch: int, steps: int) -> None:
        """Consume and drop the first ``steps`` batches of ``epoch`` (eval resume only)."""
        for step in range(steps):
            self._next_batch_outputs(self._iterator, epoch, step)

    def _batches(self, iterator: DALIGenericIterator, epoch: int, first_step: int) -> Iterator[MultiScaleBatch]:
        spec = self.spec
        scales = spec.schedule.scales_at(epoch)
        device = torch.device(spec.device)
        for step in range(first_step, spec.steps_per_epoch):
            outputs = self._next_batch_outputs(iterator, epoch, step)
            # On shards, the rank's epoch ends at shard_size samples: FILL may run past it.
            keep = min(spec.batch_size, spec.shard_size - step * spec.batch_size)
            images = {s: _checked(outputs[scale_slot(i)], s, epoch, step)[:keep] for i, s in enumerate(scales)}
            labels, valid = self._labels(outputs[LABELS_SLOT].view(-1)[:keep].long().cpu(), epoch, step)
            batch = to_model_batch(images, labels, device, channels_last=spec.channels_last, valid=valid)
            # Counted before the yield: while the caller holds this batch, it has been consumed.
            self._position = (epoch, step + 1)
            yield batch

    def _labels(self, read: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Labels and padding mask of a batch from what the reader yielded (see the module docstring)."""
        spec = self.spec
        if spec.shards is None:
            return self._padded_labels[read], read < len(spec.files)
        num_classes = spec.shards.manifest.num_classes
        if read.numel() and not 0 <= int(read.min()) <= int(read.max()) < num_classes:
            raise _damaged_pack(spec, f"a label outside 0..{num_classes - 1} in epoch {epoch}, batch {step}")
        # Eval readers stay on their own block; training readers move one block on per epoch.
        real = valid_samples(spec.num_samples, shard_id=spec.shard_id, num_shards=spec.num_shards,
                             epoch=epoch if spec.train else 0)
        return read, shard_padding_mask(real, spec.batch_size, step, read.numel())

    def _next_batch_outputs(self, iterator: DALIGenericIterator, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """Batch ``step`` of ``epoch``; after the last one, also DALI's end of epoch.

        Taking the end of epoch (and DALI's auto-reset) before the last batch is handed out means
        "after the last batch of ``e``" is one DALI state, the start of ``e + 1``, whether or not the
        caller has resumed the generator since: the checkpoint saved there needs no special case.
        """
        expected = self.spec.steps_per_epoch
        outputs = self._next_outputs(iterator, epoch)
        if outputs is None:
            self._epoch_finished = True
            raise RuntimeError(f"DALI yielded {step} batches in epoch {epoch}, expected {expected}")
        if step + 1 == expected:
            # A last batch the spec drops is still read (shards only: folder iterators drop it themselves).
            for _ in range(dali_batches(self.spec) - expected):
                if self._next_outputs(iterator, epoch) is None:
                    raise RuntimeError(f"DALI yielded {expected} batches in epoch {epoch}, expected "
                                       f"{dali_batches(self.spec)}")
            if self._next_outputs(iterator, epoch) is not None:
                raise RuntimeError(f"DALI yielded more than {expected} batches in epoch {epoch}")
            self._epoch_finished = True
        return outputs

    def _next_outputs(self, iterator: DALIGenericIterator, epoch: int) -> dict[str, torch.Tensor] | None:
        """The next batch's outputs, ``None`` at the end of the epoch; DALI's errors keep their message."""
        try:
            (outputs,) = next(iterator)
        except StopIteration:
            return None
        except RuntimeError as err:
            raise _dali_error(err, self.spec, epoch) from err
        return outputs


def _checked(images: torch.Tensor, scale: int, epoch: int, step: int) -> torch.Tensor:
    """A size other than the schedule's means the size callback and the reader disagree: a bug."""
    if tuple(images.shape[1:]) != (scale, scale, 3) or images.dtype != torch.uint8:
        raise RuntimeError(
            f"DALI produced {images.dtype} {tuple(images.shape)} in epoch {epoch} step {step}, "
            f"but the schedule says {scale}x{scale}x3 uint8"
        )
    return images
