"""Argument types and checks shared by the commands: every bad value, missing input file and unusable output path
is an argparse usage error (exit status 2) found before a command starts its work."""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

Check = Callable[[argparse.Namespace], None]


class UsageError(Exception):
    """Raised by a check: the parser turns it into a usage error."""


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that states every option's default: ``(default: X)`` is appended unless the help text already says
    what the default is (it mentions "default"); flags (default False) and options without a default (None) keep
    their own wording, which says what happens when they are not given."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in help_ or default is None or default is False
                or default == argparse.SUPPRESS or isinstance(action, argparse._HelpAction)):
            return help_
        if isinstance(default, (list, tuple)):
            shown = " ".join(str(v) for v in default)
        elif default == "":
            shown = "none"
        else:
            shown = str(default)
        return f"{help_} (default: {shown.replace('%', '%%')})".lstrip()


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser that runs its checks (cross-option rules, see `add_check`) after parsing, as usage errors.

    Sub-parsers made by ``add_subparsers`` are CommandParsers too, so each command checks its own options.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.checks: list[Check] = []

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's signature
        namespace, extras = super().parse_known_args(args, namespace)
        for check in self.checks:
            try:
                check(namespace)
            except UsageError as e:
                self.error(str(e))
        return namespace, extras


INTERRUPTED = 130  # the shell's status for a command ended by SIGINT (128 + 2)


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run a parsed command (``args.func(args)``); returns its exit status.

    Errors a user can act on end it as a usage error of ``parser`` (exit status 2, the message on one line after
    the usage, no traceback) even when found while it runs: a `UsageError`, a refused resume or a locked output
    directory (`scoresolve.evaluation.ResumeError`, ``RunLockedError``), work refused for its memory estimate
    (MemoryError), a file that cannot be written (OSError: a full disk, ``/dev/full``), a missing optional dependency
    (an ImportError saying what to pip install). A solve that fails (non-finite values, ``max_steps`` reached, a step
    size underflow: on inputs or a network the solver cannot handle) prints its one-line message and returns 1.
    Ctrl-C prints one line and returns 130 (a ``likelihood`` run resumes where it stopped)."""
    from ..evaluation import ResumeError, RunLockedError
    from ..solvers.errors import MaxStepsError, NonFiniteError, StepSizeUnderflowError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        resumable = " (run it again to resume)" if getattr(args, "out_dir", None) else ""
        print(f"{parser.prog}: interrupted{resumable}", file=sys.stderr)
        return INTERRUPTED
    except (NonFiniteError, MaxStepsError, StepSizeUnderflowError) as e:
        print(f"{parser.prog}: error: the solve failed: {one_line(str(e))}", file=sys.stderr)
        return 1
    except (UsageError, ResumeError, RunLockedError, MemoryError) as e:
        message = str(e)
    except ImportError as e:
        if "pip install" not in str(e):  # only a missing optional dependency, which says what to install
            raise
        message = str(e)
    except OSError as e:  # an output that cannot be written (a full disk, /dev/full), an input that vanished
        message = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else f"{type(e).__name__}: {e}"
    parser.error(one_line(message))
    return 2  # not reached: parser.error exits


def one_line(message: str) -> str:
    """A multi-line message on one line: its lines joined by "; " (by " " after a line ending in ":")."""
    out = ""
    for part in (p.strip() for p in message.strip().splitlines()):
        if part:
            out += ("" if not out else " " if out.endswith(":") else "; ") + part
    return out


def add_check(parser: argparse.ArgumentParser, check: Check) -> None:
    """Register a check of the parsed options (it raises UsageError); plain ArgumentParsers do not run checks."""
    if isinstance(parser, CommandParser):
        parser.checks.append(check)


def number(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, what: str | None = None) -> Callable[[str], Any]:
    """An argparse type: an int or a finite float in [low, high] (an end is excluded with ``low_open`` /
    ``high_open``). ``what`` names the value in messages (default: ``an integer``, ``a number``)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        too_low = low is not None and (v <= low if low_open else v < low)
        too_high = high is not None and (v >= high if high_open else v > high)
        if too_low or too_high:
            name = what or "the value"
            if high is None:
                rule = f"{'greater than' if low_open else 'at least'} {low:g}"
            else:
                rule = f"lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{name} must {'be ' if high is None else ''}{rule}, got {text}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


POSITIVE_INT = number(int, 1)
NONNEGATIVE_INT = number(int, 0)
POSITIVE_FLOAT = number(float, 0, low_open=True)
NONNEGATIVE_FLOAT = number(float, 0)
SEED = number(int, 0, 2**62, what="a seed")  # torch.Generator.manual_seed takes < 2^64; derived seeds add to it


def output_file(path: str) -> str:
    """An argparse type: a file path that can be written (its directory exists and is writable; '' passes)."""
    if path == "":
        return path
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise argparse.ArgumentTypeError(f"{path!r} is a directory, expected a file path")
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"cannot write {path!r}: its directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(full) and not os.access(full, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {path!r}: permission denied")
    return path


def output_file_in_new_dir(path: str) -> str:
    """An argparse type: a file path that can be written, creating its directory if needed."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise argparse.ArgumentTypeError(f"{path!r} is a directory, expected a file path")
    output_dir(os.path.dirname(full))
    if os.path.exists(full) and not os.access(full, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {path!r}: permission denied")
    return path


def output_dir(path: str) -> str:
    """An argparse type: a directory that exists and is writable, or that can be created (its nearest existing
    ancestor is a writable directory)."""
    if path == "":
        raise argparse.ArgumentTypeError("expected a directory path, got ''")
    full = os.path.abspath(path)
    if os.path.exists(full):
        if not os.path.isdir(full):
            raise argparse.ArgumentTypeError(f"{path!r} exists and is not a directory")
        if not os.access(full, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"cannot write in {path!r}: permission denied")
        return path
    ancestor = os.path.dirname(full)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise argparse.ArgumentTypeError(f"cannot create {path!r}: {ancestor!r} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create {path!r}: {ancestor!r} is not writable")
    return path


def save_tensors(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that fails with an OSError naming the path (a full disk, ``/dev/full``): the archive
    is built in memory and written with one ``open(path, "wb")`` (torch's own writer raises an opaque RuntimeError)."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        with open(path, "wb") as f:
            f.write(buf.getbuffer())
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None


def input_file(path: str) -> str:
    """An argparse type: an existing, readable file."""
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path!r}: no such file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{path!r}: permission denied")
    return path


def tensor_file(path: str) -> torch.Tensor:
    """An argparse type: a .pt file holding a tensor ``[N, ...]`` or a dict with key ``'x'``, loaded with
    ``torch.load(weights_only=True)``: a file holding anything else (arbitrary pickled objects) is refused, never
    executed."""
    input_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to load is the file's fault
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise argparse.ArgumentTypeError(
            f"cannot load {path!r} as tensors (loaded with weights_only=True, which refuses files holding other "
            f"objects): {first}"
        ) from None
    data = obj.get("x") if isinstance(obj, Mapping) else obj
    if not torch.is_tensor(data) or data.ndim < 2:
        raise argparse.ArgumentTypeError(f"{path!r}: expected a tensor [N, ...] (or a dict with key 'x')")
    if data.shape[0] == 0 or data.numel() == 0:
        raise argparse.ArgumentTypeError(f"{path!r} holds no samples (a tensor of shape {list(data.shape)})")
    return data


def key_value(text: str) -> tuple[str, Any]:
    """An argparse type: ``KEY=VALUE`` with VALUE an int, a float, a comma-separated list of ints, or a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for convert in (int, float):
        try:
            return key, convert(value)
        except ValueError:
            pass
    if "," in value:
        try:
            return key, [int(v) for v in value.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {value!r}") from None
    return key, value


def device(text: str) -> str:
    """An argparse type: a torch device string (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} ({e})") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (torch "
                                             f"{torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine; use --device cpu")
    return text


def check_t_eps(t_eps: float, sde_name: str) -> None:
    """UsageError unless 0 < t_eps < T of the named SDE."""
    from ..sde import sde_from_name

    T = sde_from_name(sde_name).T
    if not 0 < t_eps < T:
        raise UsageError(f"--t-eps must lie in (0, T) = (0, {T:g}) for the {sde_name} SDE, got {t_eps:g}")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The analytic Gaussian-mixture model of ``compare`` and ``sample``."""
    from ..sde import SDE_NAMES

    p.add_argument("--sde", choices=sorted(SDE_NAMES), default="vp", help="forward SDE (default: vp)")
    p.add_argument("--dim", type=POSITIVE_INT, default=16, help="dimension of the Gaussian-mixture model (default: 16)")
    p.add_argument("--components", type=POSITIVE_INT, default=8, help="mixture components (default: 8)")
    p.add_argument("--diagonal", action="store_true", help="axis-aligned components instead of correlated ones")
    p.add_argument("--batch", type=POSITIVE_INT, default=512, help="samples per run (default: 512)")
    p.add_argument("--t-eps", type=POSITIVE_FLOAT, default=1e-3, help="final time (default: 1e-3)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the mixture, the initial noise and every random draw")
    p.add_argument("--float64", action="store_true", help="solve in float64 (default float32)")


def mixture(args: argparse.Namespace):
    """The Gaussian mixture of ``add_model_args``'s options."""
    from ..analytic import GaussianMixture

    return GaussianMixture.random(args.dim, args.components, seed=args.seed, full=not args.diagonal)


# --------------------------------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------------------------------
MAX_DEFAULT_THREADS = 4


def default_threads() -> int:
    """min(usable CPU cores, 4), and 1 on a machine already busy (1-minute load average >= its cores): torch's own
    choice, one thread per core, stalls on an oversubscribed CPU (measured: a 2-core machine at load 8, a tiny MLP
    compare run took 75 s with 2 threads and 3 s with 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    n = max(1, min(cores, MAX_DEFAULT_THREADS))
    try:
        if os.getloadavg()[0] >= cores:
            n = 1
    except (AttributeError, OSError):
        pass
    return n


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op thread count (every command has it; `apply_threads` sets it)."""
    p.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help=f"torch intra-op threads (default: min(CPU cores, {MAX_DEFAULT_THREADS}), 1 if the machine is "
                   "already busy: torch's own choice, one per core, stalls on an oversubscribed CPU)")


def apply_threads(args: argparse.Namespace) -> int:
    """Set torch's intra-op threads to ``--threads``, else `default_threads`; returns the count."""
    n = getattr(args, "threads", None) or default_threads()
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------------------------------------------------
# the model a command runs: the analytic mixture, a shipped model, a trained checkpoint or a user's own network
# --------------------------------------------------------------------------------------------------------------------
MODEL_SPEC_HELP = (
    "your own network: MODULE:FACTORY, where MODULE is an importable module (on PYTHONPATH; the current directory is "
    "searched too) or a .py file, and FACTORY(**model_args) returns (model, sde): model a scoresolve.ScoreModel "
    "(wrap a network predicting eps/x0/v/flow with ScoreModel(net, sde, prediction=...)) or any score(x, t) "
    "callable, sde a scoresolve forward SDE (a ScoreModel alone also works: its sde is used). This imports and runs "
    "MODULE's code with your permissions, like `python MODULE.py`: give only code you trust"
)


def model_spec(text: str) -> str:
    """An argparse type: ``MODULE:FACTORY`` (the module is imported by `check_model_source`)."""
    module, sep, attr = text.rpartition(":")
    if not sep or not module or not attr.isidentifier():
        raise argparse.ArgumentTypeError(f"expected MODULE:FACTORY (e.g. mynets:make_model), got {text!r}")
    return text


def shape(text: str) -> tuple[int, ...]:
    """An argparse type: the shape of one sample, ``C,H,W`` or ``D`` (positive integers)."""
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape C,H,W or D (positive integers), got {text!r}") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected a shape C,H,W or D (positive integers), got {text!r}")
    return dims


def add_network_args(
    p: argparse.ArgumentParser, builtin: Sequence[str] = ("mixture", "digits", "digits_flow", "digits_pfgmpp"),
    model_help: str = "", with_shape: bool = True, required: bool = False,
) -> None:
    """The model options: ``--model`` (the built-in names), ``--checkpoint``, ``--model-spec`` / ``--model-arg`` and
    ``--shape``; `check_model_source` checks them and `network` loads the model. Without any of them the model is
    ``builtin[0]``, unless ``required`` (then the command's check asks for one)."""
    from ..models import BUILTIN_MODELS

    names = [n for n in builtin if n == "mixture" or n in BUILTIN_MODELS]
    p.add_argument("--model", choices=names, default=None,
                   help=(model_help or "a built-in model") + ("" if required else f" (default: {names[0]})")
                   + "; give one of --model, --checkpoint, --model-spec")
    p.add_argument("--checkpoint", type=input_file, default=None, metavar="PATH.pt",
                   help="a trained model: model.pt or train_state.pt as written by `scoresolve train` "
                   "(scoresolve.models.export_model); its process and sample shape come with it")
    p.add_argument("--model-spec", type=model_spec, default=None, metavar="MODULE:FACTORY", help=MODEL_SPEC_HELP)
    p.add_argument("--model-arg", type=key_value, action="append", metavar="KEY=VALUE",
                   help="keyword argument of --model-spec's FACTORY, repeatable (int, float, list of ints or string)")
    if with_shape:
        p.add_argument("--shape", type=shape, default=None, metavar="C,H,W|D",
                       help="shape of one sample of a --model-spec model (a checkpoint records its own)")


@dataclass
class Network:
    """A command's network: a shipped model, a checkpoint or a user's ``--model-spec`` model."""

    name: str  # how messages and model ids name it
    model: Any  # a ScoreModel or a score(x, t) callable
    sde: Any  # its ForwardSDE
    shape: tuple[int, ...] | None  # of one sample, None if unknown
    config: Any = None  # the TrainConfig of a checkpoint
    identity: str | None = None  # what a resumable run records as the model (default: name)

    @property
    def model_id(self) -> str:
        """The model's part of a run's identity: ``--model-spec`` with its ``--model-arg`` values, else the name."""
        return self.identity or self.name


def _import_factory(spec: str) -> Callable:
    import importlib
    import importlib.util

    module_name, _, attr = spec.rpartition(":")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise UsageError(f"--model-spec {spec}: {module_name!r}: no such file")
        name = os.path.splitext(os.path.basename(module_name))[0]
        loader_spec = importlib.util.spec_from_file_location(name, module_name)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's module failed: say so
            raise UsageError(f"--model-spec {spec}: importing {module_name} failed: {type(e).__name__}: {e}") from None
    else:
        added = os.getcwd() not in sys.path and "" not in sys.path
        if added:
            sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"--model-spec {spec}: cannot import {module_name!r} ({type(e).__name__}: {e}); put its "
                             "directory on PYTHONPATH or give a .py file") from None
        finally:
            if added:
                sys.path.remove(os.getcwd())
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--model-spec {spec}: module {module_name!r} has no function {attr!r}")
    return factory


def _load_spec(spec: str, kwargs: dict, shape_: tuple[int, ...] | None) -> Network:
    from ..score import ScoreModel
    from ..sde import ForwardSDE

    factory = _import_factory(spec)
    try:
        out = factory(**kwargs)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--model-spec {spec}: {spec.rpartition(':')[2]}(**{kwargs}) failed: "
                         f"{type(e).__name__}: {e}") from None
    if isinstance(out, ScoreModel):
        out = (out, out.sde)
    if not (isinstance(out, tuple) and len(out) == 2 and callable(out[0]) and isinstance(out[1], ForwardSDE)):
        raise UsageError(f"--model-spec {spec} must return (model, sde): a ScoreModel or score(x, t) callable and a "
                         f"scoresolve forward SDE; got {type(out).__name__}")
    args_ = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
    return Network(spec, out[0], out[1], shape_, identity=f"{spec}({args_})")


def _load_checkpoint(path: str) -> Network:
    from ..models.train import load_checkpoint

    try:
        model, sde, config = load_checkpoint(path)
        recorded = torch.load(path, map_location="cpu", weights_only=True).get("shape")
    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is the file's fault
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--checkpoint {path}: not a scoresolve checkpoint ({first})") from None
    return Network(path, model, sde, tuple(int(v) for v in recorded) if recorded else None, config)


def network(args: argparse.Namespace) -> Network | None:
    """The network of ``add_network_args``'s options, loaded once (None: the analytic mixture)."""
    if "_network" in vars(args):
        return args._network
    spec, path = getattr(args, "model_spec", None), getattr(args, "checkpoint", None)
    name = getattr(args, "model", None)
    if spec:
        net = _load_spec(spec, dict(args.model_arg or []), getattr(args, "shape", None))
    elif path:
        net = _load_checkpoint(path)
    elif name not in (None, "mixture"):
        from ..data import DIGITS_SHAPE
        from ..models import BUILTIN_MODELS

        model, sde = BUILTIN_MODELS[name]()
        net = Network(name, model, sde, DIGITS_SHAPE)
    else:
        net = None
    args._network = net
    return net


def check_model_source(args: argparse.Namespace, *, need_shape: bool = False) -> Network | None:
    """Usage errors for the model options (at most one source; ``--model-arg`` / ``--shape`` only with
    ``--model-spec``; an importable factory returning (model, sde); a sample shape if ``need_shape``); loads it."""
    given = [f"--{k.replace('_', '-')}" for k in ("model", "checkpoint", "model_spec") if getattr(args, k, None)]
    if len(given) > 1:
        raise UsageError(f"give one of --model, --checkpoint, --model-spec, not {' and '.join(given)}")
    if not getattr(args, "model_spec", None):
        for opt in ("model_arg", "shape"):
            if getattr(args, opt, None):
                raise UsageError(f"--{opt.replace('_', '-')} goes with --model-spec")
    net = network(args)
    if net is not None:
        if need_shape and net.shape is None:
            raise UsageError(f"the sample shape of --model-spec {net.name} is unknown: give --shape C,H,W or --shape D")
        t_eps = getattr(args, "t_eps", None)
        if t_eps is not None and not 0 < t_eps < net.sde.T:
            raise UsageError(f"--t-eps must lie in (0, T) = (0, {net.sde.T:g}) for {net.name}'s process, "
                             f"got {t_eps:g}")
    return net


def exact_model(gm, sde):
    """The mixture's exact model for a command: its score, or on an interpolant (flow matching, alpha(T) = 0,
    where a score carries no x0) its exact velocity."""
    return gm.model(sde, "flow") if sde.velocity_form else gm.score_fn(sde)


# --------------------------------------------------------------------------------------------------------------------
# dequantization (`scoresolve.quantization.dequantizers`): the options `likelihood` and `evaluate` share
# --------------------------------------------------------------------------------------------------------------------
DEQUANTIZATIONS = ("uniform", "truncnorm", "variational")
TRUNCNORM_SCALE = 0.5  # the default std (in bin widths) of --dequantization truncnorm


def add_dequantization_choice_args(p: argparse.ArgumentParser, variational_help: str,
                                   scale_default: float | None = TRUNCNORM_SCALE) -> None:
    """``--dequantization {uniform,truncnorm,variational}`` and ``--truncnorm-scale S``.

    Args:
        p: the parser.
        variational_help: what ``variational`` means for the command (how it gets its q).
        scale_default: the default S; None leaves it unset (so that a check can tell whether it was given), its
            help then stating the default `TRUNCNORM_SCALE`.
    """
    p.add_argument("--dequantization", choices=DEQUANTIZATIONS, default="uniform",
                   help="q(u | i) of the position inside each bin: uniform; truncnorm (N(1/2, S^2) truncated to the "
                   f"bin); {variational_help}. Non-uniform q reports the bound E_q[-log p + log q] / (D ln 2) + offset")
    p.add_argument("--truncnorm-scale", type=POSITIVE_FLOAT, default=scale_default, metavar="S",
                   help="std S (in bin widths) of the truncated normal of --dequantization truncnorm"
                   + ("" if scale_default is not None else f" (default: {TRUNCNORM_SCALE:g})"))


def add_dequantizer_path_arg(p: argparse.ArgumentParser, help_: str) -> None:
    """``--dequantizer-path PATH``: a variational dequantizer saved with ``VariationalDequantizer.save``."""
    p.add_argument("--dequantizer-path", type=input_file, default=None, metavar="PATH", help=help_)


def load_dequantizer(path: str, num_levels: int, data_range: Sequence[float], shape: Sequence[int]):
    """The `VariationalDequantizer` saved in ``path``, checked against the data (UsageError if it models other
    levels, another range or other samples; errors of ``VariationalDequantizer.load`` propagate)."""
    from ..quantization import VariationalDequantizer

    dq = VariationalDequantizer.load(path)
    if dq.num_levels != num_levels or tuple(dq.data_range) != tuple(data_range) or dq.shape != tuple(shape):
        raise UsageError(f"{path} holds a dequantizer of {dq.num_levels} levels in {dq.data_range} for samples "
                         f"{dq.shape}, the data have {num_levels} levels in {tuple(data_range)}, samples "
                         f"{tuple(shape)}")
    return dq
