"""scoresolve.evaluation.manifest: a resume must match the run it continues (settings, data, levels, model)."""

import functools
import json
import os

import pytest
import torch
from _evaluation_helpers import assert_same_records
from _evaluation_worker import make_fn, make_problem

import scoresolve as ss
from scoresolve.evaluation import (
    ResumeError,
    data_fingerprint,
    decode_record,
    encode_record,
    evaluate_dataset,
    model_config,
    model_fingerprint,
    read_records,
)
from scoresolve.evaluation.manifest import spot_fingerprint

F64 = torch.float64
pytestmark = pytest.mark.timeout(120)


def test_incompatible_resume_is_a_clear_error(tmp_path):
    gm, sde, x = make_problem(12)
    out = str(tmp_path / "run")
    fn = make_fn(gm, sde)
    evaluate_dataset(x, out, fn=fn, batch_size=4, repeats=2, seed=3, progress=False)
    for kwargs, key in [
        (dict(seed=4), "seed"),
        (dict(repeats=3), "repeats"),
        (dict(model_id="another model"), "model_id"),
    ]:
        args = dict(fn=fn, batch_size=4, repeats=2, seed=3, progress=False) | kwargs
        with pytest.raises(ValueError, match=rf"cannot resume(.|\n)*{key}: stored"):
            evaluate_dataset(x, out, **args)
    with pytest.raises(ValueError, match="num_samples: stored 12, now 11"):
        evaluate_dataset(x[:11], out, fn=fn, batch_size=4, repeats=2, seed=3, progress=False)
    with pytest.raises(ValueError, match="data_fingerprint"):
        evaluate_dataset(x + 1, out, fn=fn, batch_size=4, repeats=2, seed=3, progress=False)
    with pytest.raises(ValueError, match="sample_shape"):
        evaluate_dataset(x.reshape(12, 3, 1), out, fn=fn, batch_size=4, repeats=2, seed=3, progress=False)
    # a different batch size is compatible (with a warning); the exact fn gives the same numbers
    before = read_records(out)
    with pytest.warns(RuntimeWarning, match="batch_size 5"):
        evaluate_dataset(x, out, fn=fn, batch_size=5, repeats=2, seed=3, progress=False)
    assert_same_records(read_records(out), before)
    # k-bit data evaluated with dequantization cannot be resumed as continuous data
    xg = torch.randint(0, 256, (12, 3), generator=torch.Generator().manual_seed(0)) / 255 * 2 - 1
    evaluate_dataset(xg, str(tmp_path / "g"), fn=fn, bits=8, progress=False)
    with pytest.raises(ValueError, match=r"bits: stored 8, now None(.|\n)*data_range: stored \[-1.0, 1.0\], now None"):
        evaluate_dataset(xg, str(tmp_path / "g"), fn=fn, progress=False)
    # misuse of the default function
    with pytest.raises(ValueError, match="either fn, or score and sde"):
        evaluate_dataset(x, str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match="give bits"):
        evaluate_dataset(torch.zeros(3, 2, dtype=torch.uint8), str(tmp_path / "x"), fn=fn, progress=False)
    with pytest.raises(ValueError, match="would be ignored"):
        evaluate_dataset(x, str(tmp_path / "x"), fn=fn, rtol=1e-3, progress=False)


def test_resume_with_another_num_levels_is_refused(tmp_path):
    # integer levels 0..15 are valid data for 16 and for 17 levels: only the manifest can tell the runs apart
    v = torch.randint(0, 16, (10, 3), generator=torch.Generator().manual_seed(0))
    fn = lambda y, g: -y.double().pow(2).sum(1)  # noqa: E731
    out = str(tmp_path / "run")
    s = evaluate_dataset(v, out, fn=fn, num_levels=17, batch_size=4, progress=False)
    for kwargs, msg in [
        (dict(num_levels=16), r"cannot resume(.|\n)*num_levels: stored 17, now 16"),
        (dict(bits=4), r"bits: stored None, now 4(.|\n)*num_levels: stored 17, now 16"),
        (dict(num_levels=18), "num_levels: stored 17, now 18"),
        (dict(num_levels=17, data_range=(0.0, 1.0)), "data_range: stored"),
    ]:
        with pytest.raises(ValueError, match=msg):
            evaluate_dataset(v, out, fn=fn, batch_size=4, progress=False, **kwargs)
    assert evaluate_dataset(v, out, fn=fn, num_levels=17, batch_size=4, progress=False) == s
    # grid data on every L-level grid of [-1, 1] (only the end points): continuous evaluation is refused too
    xe = torch.tensor([[-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]], dtype=F64)
    evaluate_dataset(xe, str(tmp_path / "e"), fn=fn, num_levels=17, progress=False)
    with pytest.raises(ValueError, match="num_levels: stored 17, now None"):
        evaluate_dataset(xe, str(tmp_path / "e"), fn=fn, progress=False)
    # a run started before num_levels was recorded (manifest with bits only) resumes with its L = 2^bits
    old = str(tmp_path / "old")
    s = evaluate_dataset(v, old, fn=fn, bits=4, batch_size=4, progress=False)
    _edit_manifest(old, lambda m: m.pop("num_levels"))
    assert evaluate_dataset(v, old, fn=fn, num_levels=16, batch_size=4, progress=False) == s
    assert evaluate_dataset(v, old, fn=fn, bits=4, batch_size=4, progress=False) == s
    with pytest.raises(ValueError, match="num_levels: stored 16, now 17"):
        evaluate_dataset(v, old, fn=fn, num_levels=17, batch_size=4, progress=False)


class Density(torch.nn.Module):
    """A per-batch function that is a torch module: log p = -scale |x - mu|^2 (a parameter and a buffer)."""

    def __init__(self, mu: float, scale: float = 1.0):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(mu, dtype=F64))
        self.register_buffer("scale", torch.tensor(scale, dtype=F64))

    def forward(self, x, generator):
        return {"log_prob": -self.scale * (x - self.mu).pow(2).sum(1)}


def test_resume_with_another_model_is_refused_naming_both_fingerprints(tmp_path):
    _, _, x = make_problem(12)
    a, b, a_buffer = Density(0.0), Density(0.5), Density(0.0, scale=2.0)
    fa, fb, fab = (model_fingerprint(m) for m in (a, b, a_buffer))
    assert fa.startswith("Density:blake2b=") and len({fa, fb, fab}) == 3  # parameters and buffers both count
    assert model_fingerprint(Density(0.0)) == fa  # the same weights in another object: the same model
    kw = dict(batch_size=4, progress=False)
    for name, first, second in [
        ("module", a, b),
        ("buffer", a, a_buffer),
        ("closure", lambda y, g: a(y, g), lambda y, g: b(y, g)),  # a wrapper reaches its model
        ("partial", functools.partial(Density.forward, a), functools.partial(Density.forward, b)),
    ]:
        out = str(tmp_path / name)
        evaluate_dataset(x, out, fn=first, **kw)
        with open(os.path.join(out, "manifest.json")) as f:
            assert json.load(f)["model_fingerprint"] == fa
        before = read_records(out)
        with pytest.raises(ValueError, match="its records were computed with another model") as e:
            evaluate_dataset(x, out, fn=second, **kw)
        assert fa in str(e.value) and model_fingerprint(second) in str(e.value)
        assert_same_records(read_records(out), before)
    # the same model behind another wrapper resumes (nothing recomputed)
    calls, same = [], Density(0.0)
    s = evaluate_dataset(x, str(tmp_path / "module"), fn=lambda y, g: calls.append(1) or same(y, g), **kw)
    assert calls == [] and s.count == 12
    # the default per-batch function fingerprints the score model
    with pytest.raises(ValueError, match="another model"):
        evaluate_dataset(x, str(tmp_path / "module"), score=b, sde=object(), **kw)


def _edit_manifest(out, edit):
    """Rewrite ``out``'s manifest as ``edit`` leaves it (``edit(m)`` changes the dict in place); returns it."""
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    edit(m)
    with open(path, "w") as f:
        json.dump(m, f)
    return m


def _rewrite_records(out, edit):
    """Rewrite every record of ``out``'s record files as ``edit(record)``."""
    for name in os.listdir(out):
        if name.startswith("records-rank"):
            path = os.path.join(out, name)
            with open(path, "rb") as f:
                recs = [decode_record(line + b"\n") for line in f.read().splitlines()]
            with open(path, "wb") as f:
                f.write(b"".join(encode_record(edit(r)) for r in recs))


def _strip_run_identity(out):
    """Rewrite the record files of ``out`` as runs before records carried ``run`` wrote them."""
    _rewrite_records(out, lambda r: {k: v for k, v in r.items() if k != "run"})


def test_manifests_without_a_fingerprint_still_resume(tmp_path):
    _, _, x = make_problem(12)
    out = str(tmp_path / "old")
    s = evaluate_dataset(x, out, fn=Density(0.0), batch_size=4, progress=False)
    _edit_manifest(out, lambda m: m.pop("model_fingerprint"))  # written before fingerprints existed
    _strip_run_identity(out)  # ... and its records before they carried their run's identity
    assert evaluate_dataset(x, out, fn=Density(0.5), batch_size=4, progress=False) == s  # nothing to compare
    # a function that reaches no torch module has no fingerprint (model_id names such a model)
    fn = lambda y, g: -y.pow(2).sum(1)  # noqa: E731
    assert model_fingerprint(fn) is None
    evaluate_dataset(x, str(tmp_path / "plain"), fn=fn, batch_size=4, progress=False)
    with open(os.path.join(tmp_path / "plain", "manifest.json")) as f:
        assert json.load(f)["model_fingerprint"] is None


def test_deleted_manifest_cannot_mix_two_runs_records(tmp_path):
    # every record carries its run's identity: without manifest.json a resume with other settings is still refused
    gm, sde, x = make_problem(12)
    fn = make_fn(gm, sde)
    out = str(tmp_path / "run")
    evaluate_dataset(x[:8], out, fn=fn, batch_size=4, progress=False)
    os.remove(os.path.join(out, "manifest.json"))
    for kwargs in (dict(seed=1), dict(model_id="another"), dict(repeats=2)):
        with pytest.raises(ResumeError, match="records were computed by another run(.|\n)*manifest.json was missing"):
            evaluate_dataset(x[:8], out, fn=fn, batch_size=4, progress=False, **kwargs)
        os.remove(os.path.join(out, "manifest.json"))
    # the same settings resume (the records are this run's) and give the same numbers
    before = read_records(str(tmp_path / "run"), 8, 1)
    evaluate_dataset(x[:8], out, fn=fn, batch_size=4, progress=False)
    assert_same_records(read_records(out), before)
    # records without an identity (written before records carried one) under a missing manifest: refused
    _strip_run_identity(out)
    os.remove(os.path.join(out, "manifest.json"))
    with pytest.raises(ResumeError, match="another run"):
        evaluate_dataset(x[:8], out, fn=fn, batch_size=4, progress=False)


def test_data_fingerprint_covers_every_row(tmp_path):
    _, _, x = make_problem(40)
    fn = lambda y, g: -y.pow(2).sum(1)  # noqa: E731
    out = str(tmp_path / "run")
    evaluate_dataset(x, out, fn=fn, batch_size=8, progress=False)
    for row in range(40):  # the old spot check read only 16 of the 40 rows
        y = x.clone()
        y[row, 1] += 1e-12
        with pytest.raises(ResumeError, match="data_fingerprint"):
            evaluate_dataset(y, out, fn=fn, batch_size=8, progress=False)
    assert data_fingerprint(x) == data_fingerprint(list(x))  # a tensor and a dataset of its rows
    assert data_fingerprint(x) != data_fingerprint(x.float())


def test_manifest_with_a_spot_fingerprint_resumes_on_the_same_data(tmp_path):
    _, _, x = make_problem(40)
    fn = lambda y, g: -y.pow(2).sum(1)  # noqa: E731
    out = str(tmp_path / "run")
    s = evaluate_dataset(x, out, fn=fn, batch_size=8, progress=False)
    _edit_manifest(out, lambda m: m.update(data_fingerprint=spot_fingerprint(x)))  # as runs before full hashes wrote it
    _strip_run_identity(out)
    assert evaluate_dataset(x, out, fn=fn, batch_size=8, progress=False) == s
    with pytest.raises(ResumeError, match="data_fingerprint"):
        evaluate_dataset(x + 1, out, fn=fn, batch_size=8, progress=False)


@pytest.mark.parametrize("content", ["null", "[1, 2]", "{not json"])
def test_corrupt_or_null_manifest_is_a_resume_error(tmp_path, content):
    _, _, x = make_problem(4)
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text(content)
    with pytest.raises(ResumeError, match="manifest|not valid JSON"):
        evaluate_dataset(x, str(out), fn=lambda y, g: -y.pow(2).sum(1), progress=False)


def test_thread_count_is_part_of_a_cpu_runs_identity(tmp_path):
    # a CPU solve's rounding (and an adaptive solve's steps) depend on torch's thread count: no silent mix
    _, _, x = make_problem(8)
    fn = lambda y, g: -y.pow(2).sum(1)  # noqa: E731
    out = str(tmp_path / "run")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        s = evaluate_dataset(x, out, fn=fn, batch_size=4, progress=False)
        with open(os.path.join(out, "manifest.json")) as f:
            assert json.load(f)["threads"] == 1
        torch.set_num_threads(2)
        with pytest.raises(ResumeError, match="threads: stored 1, now 2"):
            evaluate_dataset(x, out, fn=fn, batch_size=4, progress=False)
        torch.set_num_threads(1)
        assert evaluate_dataset(x, out, fn=fn, batch_size=4, progress=False) == s
    finally:
        torch.set_num_threads(n)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2, dtype=F64)

    def forward(self, x, t):
        return 0.1 * self.lin(x)


@pytest.mark.parametrize("other", [dict(prediction="x0"), dict(time="index"), dict(sde="vesde"),
                                   dict(num_timesteps=500, time="index")])
def test_the_same_net_read_another_way_is_another_model(tmp_path, other):
    """A ScoreModel on the same network but with another prediction, time convention or process computes another
    likelihood: its manifest differs (model_config) and a resume is refused, also under a deleted manifest."""
    torch.manual_seed(0)
    net, sde = _Net(), ss.VPSDE()
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    base = dict(prediction="eps", time="t", num_timesteps=1000)
    a = ss.ScoreModel(net, sde, **base)
    kw = {**base, **other, "sde": ss.VESDE() if other.get("sde") == "vesde" else sde}
    b = ss.ScoreModel(net, kw.pop("sde"), **kw)
    assert model_fingerprint(a) == model_fingerprint(b)  # the same weights ...
    assert model_config(a) != model_config(b)  # ... read another way
    run = dict(batch_size=4, progress=False, rtol=1e-3, atol=1e-3)
    out = str(tmp_path / "run")
    evaluate_dataset(x, out, score=a, sde=sde, **run)
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["model_config"] == model_config(a)
    before = read_records(out)
    with pytest.raises(ResumeError, match="model_config: stored"):
        evaluate_dataset(x, out, score=b, sde=sde, **run)
    os.remove(os.path.join(out, "manifest.json"))
    with pytest.raises(ResumeError, match="computed by another run"):
        evaluate_dataset(x, out, score=b, sde=sde, **run)
    assert_same_records(read_records(out), before)
    # an fn that closes over the model is covered the same way
    def batch_fn(m):
        return lambda y, g: {"log_prob": m(y, torch.ones(len(y), dtype=F64)).sum(1)}

    fa, fb = batch_fn(a), batch_fn(b)
    assert model_config(fa) == model_config(a) and model_config(fb) == model_config(b)


def test_model_config_is_stable_text():
    """No memory address or process-dependent repr: the same model built twice has the same configuration."""
    def build():
        return ss.ScoreModel(_Net(), ss.VPSDE(), prediction="v", time=lambda t: 2 * t,
                             net_kwargs={"w": torch.ones(3), "label": 1})

    c = model_config(build())
    assert c == model_config(build()) and "0x" not in c and "prediction='v'" in c
    assert model_config(lambda y, g: y) is None


def test_a_manifest_from_before_model_config_resumes(tmp_path):
    """Runs written before ``model_config`` existed (manifest without it, records carrying that manifest's identity)
    resume without recomputing."""
    from scoresolve.evaluation import run_identity

    net, sde = _Net(), ss.VPSDE()
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    model = ss.ScoreModel(net, sde, prediction="eps")
    out = str(tmp_path / "old")
    run = dict(batch_size=4, progress=False, rtol=1e-3, atol=1e-3)
    s = evaluate_dataset(x, out, score=model, sde=sde, **run)
    ident = run_identity(_edit_manifest(out, lambda m: m.pop("model_config")))
    _rewrite_records(out, lambda r: {**r, "run": ident})
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    assert evaluate_dataset(x, out, score=model, sde=sde, **run) == s and calls == []
