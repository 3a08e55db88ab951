"""Dataset likelihood evaluation that never loses work: per-sample records on disk, resume, shards across ranks.

Modules: ``records`` (the crash-safe record store and the per-rank lock), ``manifest`` (settings and fingerprints
checked on resume), ``inputs`` (items, derived seeds, per-sample dequantization), ``distributed`` (ranks, torchrun,
waiting for the other ranks) and ``dataset`` (`evaluate_dataset`, `read_records`, `EvalSummary`).

Layout of ``out_dir``
---------------------
``manifest.json``            the run's settings (among them the data's number of levels ``num_levels`` and, for
                             L = 2^k, ``bits``; with a non-uniform dequantizer, ``dequantizer``: its
                             ``describe()``), ``model_fingerprint`` and ``model_config``; a resume with
                             incompatible settings, another dequantizer or another model is an error.
``lock-rank00000``           locked (``fcntl.flock``) by rank 0 while it runs: a second run of that rank is refused.
``records-rank00000.jsonl``  append-only records written by rank 0 (one file per rank), one line per
                             (sample index, repeat) pair:  ``<crc32 of payload, 8 hex digits> <payload>\\n``,
                             payload = compact JSON ``{"i": index, "r": repeat, "log_prob": .., "bpd": .., "nfe": ..,
                             ...}`` (every other ``[batch]`` output of the per-batch function rides along, e.g.
                             ``prior_log_prob``, ``delta_log_prob``, ``std_error``; with a non-uniform
                             dequantizer, ``log_q``, and ``bpd`` is the bound from log p - log q). Floats are
                             written with Python's shortest round-trip repr, so values read back are bit-identical.
``results.json``             written by rank 0 at the end: ``summary`` and column-wise ``records`` sorted by
                             (repeat, index), one entry per pair. With a non-uniform dequantizer the summary adds
                             ``mean_log_q`` and, for repeats > 1, ``iw_bpd``: the importance-weighted bound over
                             each sample's repeats, a bound only with exact divergences (the log-mean-exp rewards
                             Hutchinson probe noise: it biases the value low).

Each batch's lines go out in one write followed by flush + fsync. A line whose checksum, JSON, fields or trailing
newline is wrong (a torn final line after a kill, a flipped byte) is dropped with a warning and its pair is
recomputed; it is never used. A rank rewrites its own file without the bad lines (atomically) before appending.

Work units and reproducibility
------------------------------
Samples are cut into global batches ``[b * batch_size, (b + 1) * batch_size)``; unit (repeat r, batch b) has number
``u = r * n_batches + b`` and belongs to rank ``u % world_size``. A unit with any missing pair is computed whole and
its missing pairs are written (its other pairs are compared with the stored values: a mismatch warns that the
per-batch function is not deterministic). Randomness comes only from seeds derived (blake2b, see
:func:`derive_seed`) from the run's ``seed``:

* dequantization noise of sample i in repeat r (quantized data, given by ``bits`` or ``num_levels``: level v goes
  to lo + (hi - lo) (v + u) / L): a CPU generator seeded with ``derive_seed("dequant", seed, r, i)`` draws
  u = ``torch.rand(sample_shape)``: independent of batch size, sharding, restarts and device. With a
  non-uniform ``dequantizer`` the same generator drives its ``sample_unit`` on that one sample (u ~ q(u | i) and
  log q(u | i), stored as ``log_q``); `dequantized_samples` with the same dequantizer reproduces the inputs;
* the generator handed to the per-batch function (e.g. Hutchinson probes), on the batch's device, seeded with
  ``derive_seed("batch", seed, r, start, stop)``: the same for every world size and every restart, given the same
  batch size.

So with a fixed ``batch_size``, results are bit-identical whatever the number of ranks and however often the run
was killed and resumed, provided the per-batch function is deterministic given (x, generator) (true on CPU; GPU
kernels may not be). A different ``batch_size`` on resume is allowed (with a warning): the remaining pairs then get
other probe draws, which are equally valid. A per-batch function whose per-sample result does not depend on its
batch-mates (exact divergence with a per-sample adaptive solver, or an exact density) gives identical results for
every batch size.

Distributed
-----------
With ``torch.distributed`` initialised (or ``rank``/``world_size`` given), each rank computes its units with no
collective inside the loop (adaptive solves take different numbers of steps per rank), then waits until the record
files in ``out_dir`` (which must be visible to every rank) hold every pair: this wait polls files, so a slow rank
cannot trip a process-group timeout. Every rank then builds the same summary from the files; rank 0 writes
``results.json``; with a process group a final barrier makes it visible before any rank returns.
"""

from ..quantization.levels import resolve_levels
from .dataset import BatchFn, EvalSummary, evaluate_dataset, likelihood_fn, read_records
from .inputs import dequantized_samples, derive_seed
from .manifest import (
    FORMAT,
    MANIFEST,
    RESULTS,
    ResumeError,
    data_fingerprint,
    model_config,
    model_fingerprint,
    run_identity,
)
from .records import RunLockedError, decode_record, encode_record, record_path

__all__ = [
    "FORMAT",
    "MANIFEST",
    "RESULTS",
    "BatchFn",
    "ResumeError",
    "RunLockedError",
    "EvalSummary",
    "data_fingerprint",
    "decode_record",
    "dequantized_samples",
    "derive_seed",
    "encode_record",
    "evaluate_dataset",
    "likelihood_fn",
    "model_config",
    "model_fingerprint",
    "read_records",
    "record_path",
    "resolve_levels",
    "run_identity",
]
