"""Causal importance of CP components (peekcore.importance) against float64 references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import peekcore
from peekcore.edits import edited_outputs
from peekcore.errors import InvalidArgumentError
from peekcore.importance import ComponentImportance, component_importance
from peekcore.model import CPModel

N, C, S, R = 48, 6, 5, 3  # samples, channels, positions, planted components


class Planted(nn.Module):
    """Input ``z`` (N x R) -> a layer ``feat`` of exactly rank R, a ReLU, a linear head.

    Component ``r`` lives on channel ``r`` only (pattern ``e_r ∘ c_r``) and the
    head's class ``r`` reads exactly that pattern, so component ``r`` drives
    class ``r`` and nothing else.
    """

    def __init__(self, spatial: np.ndarray, head: np.ndarray) -> None:
        super().__init__()
        chan = np.zeros((C, R))
        chan[np.arange(R), np.arange(R)] = 1.0
        self.chan, self.spatial = chan, spatial
        pattern = np.einsum("cr,sr->rcs", chan, spatial).reshape(R, C * S)
        self.register_buffer("pattern", torch.tensor(pattern, dtype=torch.float32))
        self.feat = nn.Conv1d(C, C, 1, bias=False)  # the identity, channels first as captured
        self.act = nn.ReLU()
        self.head = nn.Linear(C * S, R)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(head, dtype=torch.float32))
            self.head.bias.copy_(torch.linspace(-0.5, 0.5, R))
            self.feat.weight.copy_(torch.eye(C)[:, :, None])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.feat((z @ self.pattern).reshape(-1, C, S))
        return self.head(self.act(x).flatten(1))


def planted(rng) -> tuple[Planted, np.ndarray, CPModel]:
    z = rng.uniform(0.2, 1.0, (N, R)).astype(np.float32)
    spatial = rng.uniform(0.5, 1.0, (S, R))
    head = np.zeros((R, C * S))
    for r in range(R):
        head[r] = np.einsum("c,s->cs", np.eye(C)[r], spatial[:, r]).ravel()
    net = Planted(spatial, head)
    cp = CPModel(np.ones(R), [z.astype(np.float64), net.chan.copy(), spatial.copy()])
    return net, z, cp


def layer_values(net: nn.Module, layer: str, x: np.ndarray) -> torch.Tensor:
    """The raw output of ``layer`` for inputs ``x``."""
    seen = {}
    handle = net.get_submodule(layer).register_forward_hook(lambda m, a, o: seen.update(o=o))
    with torch.no_grad():
        net(torch.as_tensor(x))
    handle.remove()
    return seen["o"].detach()


def outputs_with(net: nn.Module, layer: str, x: np.ndarray, value: torch.Tensor) -> np.ndarray:
    """The network's outputs with ``layer``'s output replaced by ``value``."""
    handle = net.get_submodule(layer).register_forward_hook(lambda m, a, o: value.to(o.dtype))
    with torch.no_grad():
        out = net(torch.as_tensor(x)).double().numpy()
    handle.remove()
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_planted_component_drives_its_class(rng):
    net, z, cp = planted(rng)
    labels = rng.integers(0, R, N)
    imp = component_importance(net, "feat", cp, z, labels=labels, batch_size=16)
    for mode, sign in (("remove", -1), ("keep", 1)):
        change = imp.logit_change[mode]
        assert change.shape == (R, R)
        for r in range(R):
            assert np.argmax(sign * change[:, r]) == r  # component r moves class r most
            assert np.argmax(sign * change[r]) == r  # and class r most of all
            assert sign * change[r, r] > 0.1
            off = np.delete(change[r], r)
            assert np.all(np.abs(off) < 1e-5 * abs(change[r, r]))
        assert [imp.top_classes(r, 1, mode)[0] for r in range(R)] == list(range(R))
    # float64 reference: the head is linear after a ReLU the edits never make active
    w = net.head.weight.detach().double().numpy()
    b = net.head.bias.detach().double().numpy()
    pat = np.einsum("cr,sr->rcs", cp.factors[1], cp.factors[2]).reshape(R, -1)
    x = z.astype(np.float64) @ pat
    base = x @ w.T + b
    zero = np.zeros_like(base) + b
    for r in range(R):
        part = np.outer(z[:, r], pat[r])
        removed, kept = (x - part) @ w.T + b, part @ w.T + b
        np.testing.assert_allclose(
            imp.logit_change["remove"][r], (removed - base).mean(0), atol=1e-5
        )
        np.testing.assert_allclose(imp.logit_change["keep"][r], (kept - zero).mean(0), atol=1e-5)
        p_change = (softmax(removed) - softmax(base)).mean(0)
        np.testing.assert_allclose(imp.probability_change["remove"][r], p_change, atol=1e-6)
        acc = np.mean(removed.argmax(1) == labels) - np.mean(base.argmax(1) == labels)
        assert imp.accuracy_change["remove"][r] == pytest.approx(acc)
    assert imp.baseline_accuracy == pytest.approx(np.mean(base.argmax(1) == labels))
    assert imp.zero_accuracy == pytest.approx(np.mean(zero.argmax(1) == labels))


def test_remove_all_equals_zero_activation(rng):
    net, z, cp = planted(rng)
    removed = edited_outputs(net, "feat", cp, z, remove=list(range(R)), sample_factors="project")
    zero = outputs_with(net, "feat", z, torch.zeros(N, C, S))
    np.testing.assert_allclose(removed, zero, atol=1e-5)
    kept_none = edited_outputs(net, "feat", cp, z, keep=[])
    np.testing.assert_array_equal(kept_none, zero.astype(np.float32).astype(np.float64))


@pytest.mark.parametrize("sample_factors", ["model", "project"])
def test_exact_rank_reconstruction_gives_the_logits(rng, sample_factors):
    net, z, cp = planted(rng)
    cp.factors[1] = cp.factors[1] + rng.uniform(0, 0.3, (C, R))  # overlapping channels
    net.pattern.copy_(
        torch.tensor(np.einsum("cr,sr->rcs", cp.factors[1], cp.factors[2])).reshape(R, -1)
    )
    plain = outputs_with(net, "feat", z, layer_values(net, "feat", z))
    full = edited_outputs(net, "feat", cp, z, keep=list(range(R)), sample_factors=sample_factors)
    np.testing.assert_allclose(full, plain, rtol=1e-5, atol=1e-5)
    unedited = edited_outputs(net, "feat", cp, z, remove=[])
    with torch.no_grad():
        np.testing.assert_array_equal(unedited, net(torch.as_tensor(z)).double().numpy())
    imp = component_importance(net, "feat", cp, z, sample_factors=sample_factors, modes="remove")
    assert imp.reconstruction_agreement == 1.0
    assert imp.reconstruction_logit_error < 1e-6
    assert imp.metadata["sample_factors"] == sample_factors


def test_nonnegative_projection_is_nnls(rng):
    """For new data a nonnegative model's rows are scipy's NNLS solutions."""
    from scipy.optimize import nnls

    from peekcore.edits import _patterns, project

    net, z, cp = planted(rng)
    pat = _patterns(cp, torch.device("cpu"))
    x = torch.tensor(rng.standard_normal((7, C * S)))
    got = project(x, pat, nonnegative=True).numpy()
    want = np.stack([nnls(pat.numpy().T, row)[0] for row in x.numpy()])
    np.testing.assert_allclose(got, want, atol=1e-9)
    lsq = project(x, pat, nonnegative=False).numpy()
    np.testing.assert_allclose(lsq, np.linalg.lstsq(pat.numpy().T, x.numpy().T, rcond=None)[0].T)


def test_fitted_model_finds_the_planted_components(rng):
    net, z, cp = planted(rng)
    x = layer_values(net, "feat", z).numpy()
    fitted = peekcore.ncp_hals(x, R, n_iter_max=60, tol=1e-12, random_state=0)
    imp = component_importance(net, "feat", fitted, z, sample_factors="model")
    match = [int(np.argmax(np.abs(fitted.factors[1][:R, r]))) for r in range(R)]
    assert sorted(match) == list(range(R))
    for r, cls in enumerate(match):
        assert imp.top_classes(r, 1, "remove") == [cls]
        assert imp.top_classes(r, 1, "keep") == [cls]


def test_batch_size_independent(rng):
    net, z, cp = planted(rng)
    labels = rng.integers(0, R, N)
    a = component_importance(net, "feat", cp, z, labels=labels, batch_size=5, pass_bytes=1)
    b = component_importance(net, "feat", cp, z, labels=labels, batch_size=N)
    assert a.metadata["forward_passes"] == 10 * (R + 2)  # two edits per pass at pass_bytes=1
    for mode in a.modes:
        np.testing.assert_allclose(a.logit_change[mode], b.logit_change[mode], atol=1e-5)
        np.testing.assert_allclose(
            a.probability_change[mode], b.probability_change[mode], atol=1e-6
        )
        np.testing.assert_array_equal(a.accuracy_change[mode], b.accuracy_change[mode])


def test_relu_layer_clipping(rng):
    """At a ReLU layer, edits are clipped at zero by default; clip=False passes negatives on."""
    net, z, cp = planted(rng)
    x = layer_values(net, "act", z)
    low = peekcore.cp_als(x.numpy(), 1, n_iter_max=10, random_state=0)
    pat = np.einsum("cr,sr->rcs", low.factors[1], low.factors[2])[0]
    part = (low.factors[0][:, 0] * low.weights[0])[:, None, None] * pat
    removed = x.double().numpy() - part
    assert removed.min() < -1e-3  # the edit undershoots zero somewhere
    clipped = outputs_with(net, "act", z, torch.tensor(np.maximum(removed, 0)))
    raw = outputs_with(net, "act", z, torch.tensor(removed))
    cf = {"sample_factors": "model", "layout": "channels_first"}  # 3-way ReLU outputs: tokens
    default = edited_outputs(net, "act", low, z, remove=[0], **cf)
    np.testing.assert_allclose(default, clipped, atol=1e-5)
    unclipped = edited_outputs(net, "act", low, z, remove=[0], clip=False, **cf)
    np.testing.assert_allclose(unclipped, raw, atol=1e-5)
    assert np.abs(clipped - raw).max() > 1e-2
    # not a ReLU: no clipping unless asked (here the ReLU after it clips what it passes on)
    feat = edited_outputs(net, "feat", low, z, remove=[0], sample_factors="model")
    np.testing.assert_allclose(feat, outputs_with(net, "feat", z, torch.tensor(removed)), atol=1e-5)
    imp = component_importance(net, "feat", low, z, sample_factors="model", modes="keep")
    assert imp.metadata["clip"] is False


class Layouts(nn.Module):
    """``z`` -> a layer whose raw output is exactly rank R -> a linear head on it, flattened."""

    def __init__(self, raw: str, factors: list[np.ndarray], k: int = 4) -> None:
        super().__init__()
        self.raw = raw
        self.n_factors = len(factors)
        for i, f in enumerate(factors):
            self.register_buffer(f"f{i}", torch.tensor(f, dtype=torch.float32))
        self.layer = nn.Identity()
        self.head = nn.Linear(int(np.prod([f.shape[0] for f in factors])), k)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        fs = [getattr(self, f"f{i}") for i in range(self.n_factors)]
        out = self.layer(torch.einsum(self.raw, z, *fs))
        if self.raw.endswith("->bna"):  # sequence first: batch to the front for the head
            out = out.permute(1, 0, 2)
        return self.head(out.flatten(1))


#: raw output (einsum of z and the factors), capture settings, peekcore's arrangement of it
LAYOUT_CASES = {
    "channels_first": ("nr,ar,br,cr->nabc", {}, lambda x: x),
    "folded": ("nr,ar,br,cr->nabc", {"fold_spatial": True}, lambda x: x.reshape(len(x), 4, 6)),
    "channels_last": (
        "nr,ar,br,cr->nbca",
        {"layout": "channels_last"},
        lambda x: x.permute(0, 3, 1, 2),
    ),
    "tokens": ("nr,ar,br->nba", {"layout": "tokens"}, lambda x: x.permute(0, 2, 1)),
    "sequence_first": ("nr,ar,br->bna", {"layout": "sequence_first"}, lambda x: x.permute(1, 2, 0)),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_layouts_are_mapped_back(rng, case):
    raw, settings, arrange = LAYOUT_CASES[case]
    n_modes = raw.index("->") // 3  # factors after z
    z = rng.uniform(0.2, 1.0, (12, R)).astype(np.float32)
    f = [rng.standard_normal((n, R)) for n in (4, 3, 2)[:n_modes]]
    net = Layouts(raw, f)
    x = layer_values(net, "layer", z)
    factors = [z, *f]
    if case == "folded":
        factors = [z, f[0], np.einsum("hr,wr->hwr", f[1], f[2]).reshape(6, R)]
    cp = CPModel(np.ones(R), [np.asarray(a, dtype=np.float64) for a in factors])
    np.testing.assert_allclose(cp.reconstruct(), arrange(x).double(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = net(torch.as_tensor(z)).double().numpy()
    for rows in ("model", "project"):
        full = edited_outputs(
            net, "layer", cp, z, keep=list(range(R)), sample_factors=rows, **settings
        )
        np.testing.assert_allclose(full, plain, rtol=1e-4, atol=1e-4)
    # component 1 alone, put back into the raw layout by hand (inverting arrange)
    part = CPModel(np.ones(1), [a[:, 1:2] for a in cp.factors]).reconstruct()
    back = torch.zeros(x.shape, dtype=torch.float64)
    arrange(back).copy_(torch.tensor(part))  # arrange gives views: writes land in back
    kept = edited_outputs(net, "layer", cp, z, keep=[1], sample_factors="model", **settings)
    np.testing.assert_allclose(kept, outputs_with(net, "layer", z, back), rtol=1e-5, atol=1e-5)


def test_store_settings_and_fitted_rows(rng, tmp_path):
    net, z, cp = planted(rng)
    labels = rng.integers(0, R, N)
    store = peekcore.capture(
        net,
        (z, labels),
        "act",
        tmp_path / "s.zarr",
        dtype="float32",
        fold_spatial=True,
        layout="channels_first",
        batch_size=16,
    )
    imp = component_importance(net, "act", cp, (z, labels), store=store)
    assert imp.metadata["sample_factors"] == "model"
    assert imp.metadata["fold_spatial"] is True and imp.metadata["clip"] is True
    with torch.no_grad():
        plain = net(torch.as_tensor(z)).argmax(1).numpy()
    assert imp.baseline_accuracy == pytest.approx(np.mean(plain == labels))
    flipped = (z[::-1].copy(), labels[::-1].copy())
    assert (
        component_importance(net, "act", cp, flipped, store=store).metadata["sample_factors"]
        == "project"
    )
    with pytest.raises(InvalidArgumentError, match="captured layer 'act' with fold_spatial=True"):
        component_importance(net, "act", cp, z, store=store, fold_spatial=False)


def test_the_captured_inputs_match_with_or_without_labels(rng, tmp_path):
    """The store's inputs fingerprint decides; a store without one falls back and says so."""
    net, z, cp = planted(rng)
    labels = rng.integers(0, R, N)
    opts = {"dtype": "float32", "layout": "channels_first", "batch_size": 16}
    paired = peekcore.capture(net, (z, labels), "act", tmp_path / "p.zarr", **opts)
    alone = peekcore.capture(net, z, "act", tmp_path / "a.zarr", **opts)
    cp = CPModel(cp.weights, [cp.factors[0] + 0.05, *cp.factors[1:]])  # rows no projection gives
    ref = component_importance(net, "act", cp, (z, labels), store=paired)
    np.save(tmp_path / "z.npy", z)
    for store in (paired, alone):
        for data in ((z, labels), z, torch.from_numpy(z), tmp_path / "z.npy"):
            imp = component_importance(net, "act", cp, data, labels=labels, store=store)
            meta = imp.metadata
            assert (meta["sample_factors"], meta["data_check"], meta["same_data"]) == (
                "model",
                "inputs_fingerprint",
                True,
            )
            for mode in imp.modes:
                np.testing.assert_array_equal(imp.logit_change[mode], ref.logit_change[mode])
    other = component_importance(net, "act", cp, z[::-1].copy(), store=alone).metadata
    assert (other["sample_factors"], other["same_data"]) == ("project", False)
    projected = component_importance(
        net, "act", cp, z, labels=labels, sample_factors="project", layout="channels_first"
    )
    assert not np.allclose(projected.logit_change["keep"], ref.logit_change["keep"], atol=1e-3)
    assert projected.metadata["data_check"] is None
    # a store captured before inputs fingerprints: its data_fingerprint (inputs and labels)
    meta_file = tmp_path / "p.zarr" / "zarr.json"
    doc = json.loads(meta_file.read_text())
    del doc["attributes"]["settings"]["inputs_fingerprint"]
    meta_file.write_text(json.dumps(doc))
    old = peekcore.ActivationStore(tmp_path / "p.zarr")
    meta = component_importance(net, "act", cp, (z, labels), store=old).metadata
    assert (meta["sample_factors"], meta["data_check"], meta["same_data"]) == (
        "model",
        "data_fingerprint",
        True,
    )
    meta = component_importance(net, "act", cp, z, labels=labels, store=old).metadata
    assert (meta["sample_factors"], meta["data_check"], meta["same_data"]) == (
        "project",
        "data_fingerprint",
        False,
    )


def test_save_load_and_table(rng, tmp_path):
    net, z, cp = planted(rng)
    imp = component_importance(net, "feat", cp, z, labels=rng.integers(0, R, N))
    imp.save(tmp_path / "imp.npz")
    back = ComponentImportance.load(tmp_path / "imp.npz")
    assert back.modes == imp.modes and back.layer == "feat"
    for mode in imp.modes:
        np.testing.assert_array_equal(back.logit_change[mode], imp.logit_change[mode])
        np.testing.assert_array_equal(back.accuracy_change[mode], imp.accuracy_change[mode])
    assert back.summary() == imp.summary()
    rows = back.table(k=2)
    assert len(rows) == R and rows[1]["drives (remove)"].startswith("1 (-")
    without = component_importance(net, "feat", cp, z, modes=("keep",))
    assert np.isnan(without.baseline_accuracy) and np.all(np.isnan(without.accuracy_change["keep"]))
    without.save(tmp_path / "k.npz")
    assert ComponentImportance.load(tmp_path / "k.npz").modes == ("keep",)
    cp.save(tmp_path / "m.npz")
    with pytest.raises(ValueError, match="not a peekcore component importance file"):
        ComponentImportance.load(tmp_path / "m.npz")


def test_bad_input(rng):
    net, z, cp = planted(rng)
    with pytest.raises(KeyError, match="no layer 'feet'.*feat"):
        component_importance(net, "feet", cp, z)
    small = CPModel(np.ones(R), [cp.factors[0], cp.factors[1][:4], cp.factors[2]])
    with pytest.raises(
        InvalidArgumentError, match=r"fitted to samples of shape \(4, 5\).*\(6, 5\)"
    ):
        component_importance(net, "feat", small, z)
    four = Layouts("nr,ar,br,cr->nabc", [rng.standard_normal((n, R)) for n in (4, 3, 2)])
    folded = CPModel(np.ones(R), [cp.factors[0], rng.random((4, R)), rng.random((6, R))])
    with pytest.raises(InvalidArgumentError, match="another layout of this layer.*fold_spatial"):
        component_importance(four, "layer", folded, z)
    with pytest.raises(ValueError, match="pass_bytes"):
        component_importance(net, "feat", cp, z, pass_bytes=0)
    with pytest.raises(InvalidArgumentError, match="modes must be"):
        component_importance(net, "feat", cp, z, modes=("ablate",))
    with pytest.raises(InvalidArgumentError, match="data has 47"):
        component_importance(net, "feat", cp, z[:47], sample_factors="model")
    with pytest.raises(InvalidArgumentError, match=r"labels must be one class index per sample"):
        component_importance(net, "feat", cp, z, labels=np.zeros(3, int))
    with pytest.raises(InvalidArgumentError, match=r"class indices 0..2 \(the network gives 3"):
        component_importance(net, "feat", cp, z, labels=np.full(N, 3))
    with pytest.raises(InvalidArgumentError, match="logits of shape"):
        component_importance(nn.Sequential(net, nn.Flatten(0)), "0.feat", cp, z)
    with pytest.raises(InvalidArgumentError, match="exactly one of"):
        edited_outputs(net, "feat", cp, z)
    with pytest.raises(InvalidArgumentError, match="not in 0..2"):
        edited_outputs(net, "feat", cp, z, keep=[3])


class Skip(nn.Module):
    """A skip connection around the edited layer: its copies meet a tensor from before it."""

    def __init__(self, factors: list[np.ndarray]) -> None:
        super().__init__()
        self.register_buffer("b", torch.tensor(factors[0], dtype=torch.float32))
        self.register_buffer("c", torch.tensor(factors[1], dtype=torch.float32))
        self.layer = nn.Conv1d(C, C, 1)
        self.head = nn.Linear(C * S, 4)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("nr,cr,sr->ncs", z, self.b, self.c)
        return self.head((self.layer(h) + h).flatten(1))


def test_skip_connection_around_the_layer(rng):
    """Edits are stacked after the layer only where that gives the same logits."""
    z = rng.uniform(0.2, 1.0, (20, R)).astype(np.float32)
    net = Skip([rng.standard_normal((C, R)), rng.standard_normal((S, R))])
    x = layer_values(net, "layer", z).double().numpy()
    cp = peekcore.cp_als(x, R, n_iter_max=30, random_state=0)
    imp = component_importance(net, "layer", cp, z, sample_factors="model", batch_size=8)
    assert imp.metadata["stacked_after_layer"] is False
    h = torch.einsum("nr,cr,sr->ncs", torch.as_tensor(z), net.b, net.c).double().numpy()
    w, bias = net.head.weight.detach().double().numpy(), net.head.bias.detach().double().numpy()
    a = cp.factors[0] * cp.weights
    base = (x + h).reshape(len(z), -1) @ w.T + bias
    for r in range(R):
        part = np.einsum("n,c,s->ncs", a[:, r], cp.factors[1][:, r], cp.factors[2][:, r])
        removed = (x - part + h).reshape(len(z), -1) @ w.T + bias
        np.testing.assert_allclose(
            imp.logit_change["remove"][r], (removed - base).mean(0), atol=1e-4
        )
    pnet, pz, pcp = planted(rng)  # a plain sequence of layers
    assert component_importance(pnet, "feat", pcp, pz).metadata["stacked_after_layer"] is True


class Pair(nn.Module):
    """A layer whose output is a tuple or dict holding the activation (``select=``)."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor) -> object:
        extra = x.sum(dim=(1, 2))
        return {"extra": extra, "acts": x} if self.as_dict else (x, extra)


class Selected(nn.Module):
    def __init__(self, planted: Planted, as_dict: bool) -> None:
        super().__init__()
        self.planted = planted
        self.layer = Pair(as_dict)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        p = self.planted
        out = self.layer(p.feat((z @ p.pattern).reshape(-1, C, S)))
        acts, extra = (out["acts"], out["extra"]) if isinstance(out, dict) else out
        return p.head(p.act(acts).flatten(1)) + extra[:, None]


@pytest.mark.parametrize("select", [0, "acts", {"layer": 0}, {"layer": "acts"}])
def test_select_puts_the_edit_back(rng, select):
    net, z, cp = planted(rng)
    # {layer: selector}, as capture takes it and its error message for a tuple suggests
    picked = select["layer"] if isinstance(select, dict) else select
    sel = Selected(net, as_dict=picked == "acts")
    kw = {"select": select, "layout": "channels_first", "sample_factors": "model"}
    kept = edited_outputs(sel, "layer", cp, z, keep=[1], **kw)
    part = torch.tensor(CPModel(np.ones(1), [f[:, 1:2] for f in cp.factors]).reconstruct())
    x = layer_values(net, "feat", z)
    extra = x.double().sum(dim=(1, 2))[:, None].numpy()  # from before the edit: unchanged
    want = outputs_with(net, "feat", z, part) + extra
    np.testing.assert_allclose(kept, want, rtol=1e-5, atol=1e-4)


def test_store_with_a_callable_select(rng, tmp_path):
    net, z, cp = planted(rng)
    sel = Selected(net, as_dict=False)
    store = peekcore.capture(
        sel, z, "layer", tmp_path / "s.zarr", dtype="float32", layout="channels_first",
        select=lambda out: out[0],
    )  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="captured with a callable select"):
        component_importance(sel, "layer", cp, z, store=store)
    plain = peekcore.capture(
        sel, z, "layer", tmp_path / "t.zarr", dtype="float32", layout="channels_first",
        select=0,
    )  # fmt: skip
    imp = component_importance(sel, "layer", cp, z, store=plain)
    assert imp.metadata["select"] == 0 and imp.metadata["sample_factors"] == "model"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(rng):
    net, z, cp = planted(rng)
    with pytest.raises(InvalidArgumentError, match="device 'cuda'.*use device 'cpu'"):
        component_importance(net, "feat", cp, z, device="cuda")


def test_non_finite_activations_and_logits_are_clear_errors(rng):
    net, z, cp = planted(rng)
    bad = z.copy()
    bad[5, 0] = np.nan
    for sample_factors in ("model", "project"):
        with pytest.raises(InvalidArgumentError, match="layer 'feat' gives non-finite values"):
            component_importance(net, "feat", cp, bad, sample_factors=sample_factors)

    class LogAfter(nn.Module):  # finite layer, NaN logits once a component is removed
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return torch.log(self.net(z) - self.net.head.bias - 1e-3)

    # removing component r zeroes class r's logit above its bias: the log of a negative
    with pytest.raises(InvalidArgumentError, match="logits are not finite.*edit"):
        component_importance(LogAfter(), "net.feat", cp, z, modes=("remove",), clip=False)


def test_shared_module_that_runs_twice_is_refused(rng):
    """One nn.Tanh after two layers: its hook fires twice per forward, and editing both
    outputs with the first one's components gave wrong logits without a word."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2, self.head = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 3)
            self.act = nn.Tanh()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.act(self.l2(self.act(self.l1(x)))))

    x = rng.standard_normal((10, 6)).astype(np.float32)
    cp = CPModel(np.ones(2), [rng.standard_normal((10, 2)), rng.standard_normal((5, 2))])
    for call in (component_importance, lambda *a, **k: edited_outputs(*a, remove=[0], **k)):
        with pytest.raises(InvalidArgumentError, match="'act' ran twice in one forward pass"):
            call(Shared(), "act", cp, x, sample_factors="model")


def test_result_path_is_recorded_absolute(rng, tmp_path, monkeypatch):
    """``peek report`` puts the figure beside its model by this path, from any folder."""
    net, z, cp = planted(rng)
    (tmp_path / "run").mkdir()
    cp.save(tmp_path / "run" / "model.npz")
    monkeypatch.chdir(tmp_path / "run")
    imp = component_importance(net, "feat", "model.npz", z, modes=("remove",))
    monkeypatch.chdir(tmp_path)
    assert imp.metadata["result"] == str(tmp_path / "run" / "model.npz")


def test_edit_options_show_in_both_signatures_and_wrong_ones_are_refused(rng):
    """component_importance and edited_outputs take the same keywords (EditOptions),
    shown in their signatures; a misspelt one is refused before any forward pass."""
    import dataclasses
    import inspect

    from peekcore.edits import EditOptions

    options = [f.name for f in dataclasses.fields(EditOptions)]
    imp_sig = inspect.signature(component_importance).parameters
    out_sig = inspect.signature(edited_outputs).parameters
    for name in options:
        assert imp_sig[name].kind == out_sig[name].kind == inspect.Parameter.KEYWORD_ONLY
        assert imp_sig[name].default == out_sig[name].default
    assert {"labels", "modes"} <= set(imp_sig) and {"remove", "keep"} <= set(out_sig)
    assert not any(p.kind == p.VAR_KEYWORD for p in [*imp_sig.values(), *out_sig.values()])
    net, z, cp = planted(rng)
    calls = {"weights": 0}
    net.head.register_forward_hook(lambda *a: calls.update(weights=calls["weights"] + 1))
    with pytest.raises(TypeError, match="unexpected keyword argument 'batchsize'"):
        component_importance(net, "feat", cp, z, batchsize=8)
    with pytest.raises(TypeError, match="unexpected keyword argument 'labels'"):
        edited_outputs(net, "feat", cp, z, remove=[0], labels=np.zeros(N))
    assert calls["weights"] == 0
    # pass_bytes, once component_importance's alone, is checked and taken by edited_outputs
    with pytest.raises(ValueError, match="pass_bytes"):
        edited_outputs(net, "feat", cp, z, remove=[0], pass_bytes=0)
    small = edited_outputs(net, "feat", cp, z, remove=[1], pass_bytes=1)
    np.testing.assert_array_equal(small, edited_outputs(net, "feat", cp, z, remove=[1]))
