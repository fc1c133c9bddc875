"""Sequential, output-aware reduction: exact at full key dim, closed-form steps equal brute-force solves, and bottom-up
fitting beats fitting every layer on the original's inputs."""

import pytest
import torch

from conftest import final_error, padded_batch, tiny_model
from mhacompress.reduction.calibrate import second_moments
from mhacompress.reduction.config import ReductionConfig
from mhacompress.reduction.modeling import attention_modules, layers
from mhacompress.reduction.sequential import (
    BEYOND,
    STRENGTHS,
    Batch,
    LayerMoments,
    Plan,
    RefinementLoss,
    Ridge,
    Spill,
    StepSchedule,
    embed,
    layer_at,
    layer_inputs,
    layer_statistics,
    reduce_sequential_,
    row_weights,
    run_layer,
    run_until,
    solve_qk_,
    token_weights,
)
from mhacompress.reduction.surgery import finish_, reduce_


def calibration(n=6, seed=0):
    return [padded_batch(lengths=(9, 4, 7, 1, 8, 6), seed=seed + i) for i in range(n)]


def sequential(model, key_dim, batches, **plan):
    config = ReductionConfig(key_dim=key_dim, n_iter_max=30)
    p = reduce_sequential_(model, config, [key_dim] * 2, batches, Plan(**plan))
    finish_(model, config, p.reports, source="tiny", tool_version="test", modified=p.modified)
    return p


def test_layer_inputs_are_the_embeddings_and_run_layer_is_the_model():
    model, batch = tiny_model("bert"), padded_batch()
    hidden, args, kwargs = layer_inputs(model, batch)
    with torch.no_grad():
        torch.testing.assert_close(hidden, model.embeddings(input_ids=batch["input_ids"]))
        for layer in layers(model):
            hidden = run_layer(layer, hidden, args, kwargs)
        torch.testing.assert_close(hidden, model(**batch).last_hidden_state)


@pytest.mark.parametrize("model_type", ["bert", "mpnet", "distilbert", "ernie"])
@pytest.mark.parametrize("compensate", [False, True])
@pytest.mark.parametrize("objective", ["output", "score"])
def test_sequential_reduction_is_exact_at_full_key_dim(model_type, compensate, objective):
    model, original, batches = tiny_model(model_type), tiny_model(model_type), calibration()
    sequential(model, 32, batches, objective=objective, compensate=compensate, compensation_strength=1e-9)
    assert final_error(model, original, batches) < 1e-4


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_a_classifier_calibrated_on_fewer_first_tokens_than_its_width_is_still_exact_at_full_key_dim(model_type):
    # the last layer is fitted at the first token only: 12 of them span 12 of 32 directions, and the input map must
    # not invent the other 20 (it made logits on unseen sequences differ by up to 1.8)
    model, original = tiny_model(model_type, head=True), tiny_model(model_type, head=True)
    p = reduce_sequential_(model, ReductionConfig(key_dim=32, n_iter_max=30), [32, 32], calibration(2),
                           Plan(first_token_last=True))
    finish_(model, ReductionConfig(key_dim=32), p.reports, source="tiny", tool_version="test", modified=p.modified)
    with torch.no_grad():
        for batch in calibration(4, seed=1000):
            torch.testing.assert_close(model(**batch).logits, original(**batch).logits, atol=2e-3, rtol=0)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("objective", ["output", "score"])
def test_full_key_dim_calibrated_on_a_few_sequences_reproduces_the_model_on_other_sequences(model_type, objective):
    # layer 0 reproduces its output to float rounding; an input map fitted to that rounding noise, divided by the
    # small eigenvalues of a few sequences' moments, moved unseen sequences' last hidden states by up to 9%
    model, original = tiny_model(model_type), tiny_model(model_type)
    sequential(model, 32, [padded_batch(lengths=(9, 4, 7), seed=1)], objective=objective, compensate=True)
    assert final_error(model, original, calibration(4, seed=1000)) < 1e-5


def test_the_input_map_is_the_identity_where_the_tokens_say_nothing():
    gen = torch.Generator().manual_seed(0)
    xr = torch.zeros(1, 200, 6, dtype=torch.float64)
    xr[..., :3] = torch.randn(1, 200, 3, generator=gen, dtype=torch.float64)  # the tokens span 3 of 6 directions
    x = xr @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    tokens = torch.ones(1, 200, dtype=torch.bool)
    m = LayerMoments(6)
    m.add(x, xr, tokens, tokens)
    p = m.input_map()
    torch.testing.assert_close(p[:, 3:], torch.eye(6, dtype=torch.float64)[:, 3:])  # unseen: x~ taken as x
    torch.testing.assert_close(xr[0] @ p.T, x[0], atol=1e-2, rtol=1e-2)  # seen: the least-squares map


def test_sequential_beats_parallel_on_the_final_layer():
    batches, held_out = calibration(30), calibration(10, seed=1000)  # enough tokens for a 32 x 32 input map
    original = tiny_model("bert")
    parallel = tiny_model("bert")
    reduce_(parallel, ReductionConfig(key_dim=8, n_iter_max=30), moments=second_moments(parallel, batches))
    bottom_up = tiny_model("bert")
    sequential(bottom_up, 8, batches)
    assert final_error(bottom_up, original, batches) < final_error(parallel, original, batches)
    assert final_error(bottom_up, original, held_out) < final_error(parallel, original, held_out)


def test_compensation_lowers_the_error_and_is_recorded(tmp_path):
    batches, original = calibration(), tiny_model("bert")
    plain, compensated = tiny_model("bert"), tiny_model("bert")
    sequential(plain, 4, batches)
    plan = sequential(compensated, 4, batches, compensate=True)
    assert final_error(compensated, original, batches) < final_error(plain, original, batches)
    assert plan.modified == ["encoder.layer.0.attention.output.dense", "encoder.layer.1.attention.output.dense"]
    assert compensated.config.compression["modified"] == plan.modified
    changed = compensated.encoder.layer[0].attention.output.dense.weight
    assert not torch.equal(changed, original.encoder.layer[0].attention.output.dense.weight)


def test_refinement_with_compensation_refits_each_projection_once_more_and_names_it_once():
    model, original, batches = tiny_model("bert"), tiny_model("bert"), calibration()
    plan = sequential(model, 4, batches, compensate=True, refine_steps=10)
    assert plan.modified == ["encoder.layer.0.attention.output.dense", "encoder.layer.1.attention.output.dense"]
    compensated_only = tiny_model("bert")
    sequential(compensated_only, 4, batches, compensate=True)
    assert final_error(model, original, batches) < final_error(compensated_only, original, batches)


def test_refinement_reports_its_steps_as_progress_of_each_layer():
    events = []
    config = ReductionConfig(key_dim=4, n_iter_max=30)
    reduce_sequential_(tiny_model("bert"), config, [4, 4], calibration(2), Plan(refine_steps=3),
                       on_progress=lambda *event: events.append(event))
    refined = [e for e in events if e[0].endswith("refinement")]
    assert refined == [(f"layer {i}: refinement", s, 3) for i in (0, 1) for s in (1, 2, 3)]


def test_refinement_lowers_every_layers_output_error():
    model = tiny_model("bert")
    plan = sequential(model, 4, calibration(), refine_steps=40, refine_lr=1e-2)
    assert all(r["output_error_after"] < r["output_error_before"] for r in plan.reports), plan.reports


def with_junk_padding(batches, seed=0):
    """The same batches with random tokens instead of the pad token at the padding positions: the real tokens'
    outputs are unchanged (padding is masked out), the hidden states at the padding positions are not."""
    gen, out = torch.Generator().manual_seed(seed), []
    for batch in batches:
        pad = ~batch["attention_mask"].bool()
        ids = batch["input_ids"].clone()
        ids[pad] = torch.randint(3, 100, (int(pad.sum()),), generator=gen)
        out.append({**batch, "input_ids": ids})
    return out


def test_refinement_fits_real_tokens_only():
    """Whatever the padding positions hold, the refined layers are the same: the loss counts real tokens only."""
    batches = calibration()
    clean, junk = tiny_model("bert"), tiny_model("bert")
    a = sequential(clean, 4, batches, refine_steps=20, refine_lr=1e-2)
    b = sequential(junk, 4, with_junk_padding(batches), refine_steps=20, refine_lr=1e-2)
    assert [r["output_error_after"] for r in a.reports] == pytest.approx([r["output_error_after"] for r in b.reports],
                                                                          rel=1e-6)
    for name, weight in clean.state_dict().items():
        torch.testing.assert_close(junk.state_dict()[name], weight, rtol=1e-6, atol=1e-7, msg=name)


def test_the_input_map_is_the_least_squares_solution():
    gen = torch.Generator().manual_seed(0)
    xr = torch.randn(1, 500, 6, generator=gen, dtype=torch.float64)  # the reduced stream
    x = xr @ torch.randn(6, 6, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(1, 500, 6, generator=gen,
                                                                                            dtype=torch.float64)
    tokens = torch.ones(1, 500, dtype=torch.bool)
    m = LayerMoments(6)
    m.add(x, xr, tokens, tokens)
    want = torch.linalg.lstsq(xr[0], x[0]).solution.T  # x ~ P x~
    torch.testing.assert_close(m.input_map(ridge=0.0), want)


def test_the_layer_moments_count_the_queries_and_the_keys_apart():
    """A classifier's last layer: queries at the first token only, keys at every real token, the reduced stream
    drifted from the original. The query moment is the mean x~ x~^T over the queries, the key moment over the real
    tokens, and the input map is the least-squares map x ~ P x~ over the real tokens, whatever the query count."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.arange(6)[None, :] < torch.tensor([6, 4, 5])[:, None]  # (3, 6), padded
    queries = torch.zeros_like(tokens)
    queries[:, 0] = True
    m, xs, xrs = LayerMoments(3), [], []
    for _ in range(2):  # streamed in two batches
        x = torch.randn(3, 6, 3, generator=gen, dtype=torch.float64)
        xr = x @ torch.randn(3, 3, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(3, 6, 3, generator=gen,
                                                                                              dtype=torch.float64)
        m.add(x, xr, tokens, queries)
        xs.append(x)
        xrs.append(xr)
    q = torch.cat([xr[queries] for xr in xrs])  # (6, 3)
    k, orig = torch.cat([xr[tokens] for xr in xrs]), torch.cat([x[tokens] for x in xs])  # (30, 3)
    torch.testing.assert_close(m.query_moment(), q.T @ q / 6)
    torch.testing.assert_close(m.key_moment(), k.T @ k / 30)
    torch.testing.assert_close(m.input_map(ridge=0.0), torch.linalg.lstsq(k, orig).solution.T)


def test_the_ridge_refit_is_the_weighted_regularised_least_squares_solution():
    """Rows weighted, the weights pulled towards the original by lam = strength * mean input power, the bias free."""
    gen = torch.Generator().manual_seed(0)
    z, t = torch.randn(300, 5, generator=gen, dtype=torch.float64), torch.randn(300, 3, generator=gen,
                                                                                  dtype=torch.float64)
    w0, b0 = torch.randn(3, 5, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
    rw = torch.rand(300, generator=gen, dtype=torch.float64) * 2
    ridge = Ridge(5, 3)
    ridge.add(z[:100], t[:100], rw[:100])
    ridge.add(z[100:], t[100:], rw[100:])  # streamed in two batches
    w, b = ridge.solve(w0, b0, strength=0.5)
    za = torch.cat([z, torch.ones(300, 1, dtype=torch.float64)], 1)
    lam = 0.5 * (rw[:, None] * z * z).sum(0).mean()
    # brute force: sqrt(weight)-scaled data rows and sqrt(lam) * (I, prior) rows for the weights only, by lstsq
    penalty = torch.cat([lam.sqrt() * torch.eye(5, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.float64)], 1)
    rows = torch.cat([rw.sqrt()[:, None] * za, penalty])
    rhs = torch.cat([rw.sqrt()[:, None] * t, lam.sqrt() * w0.T])
    want = torch.linalg.lstsq(rows, rhs).solution
    torch.testing.assert_close(w, want[:-1].T)
    torch.testing.assert_close(b, want[-1])


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_the_ridge_gives_any_maps_relative_error_without_another_pass(weighted):
    """sum w ||W z + b - t||^2 / sum w ||t||^2, from the streamed normal equations, for the solution and for another
    map alike (the refinement is judged by it, where it took a pass over the batches)."""
    gen = torch.Generator().manual_seed(1)
    z, t = torch.randn(200, 4, generator=gen, dtype=torch.float64), torch.randn(200, 3, generator=gen,
                                                                                  dtype=torch.float64)
    rw = torch.rand(200, generator=gen, dtype=torch.float64) if weighted else torch.ones(200, dtype=torch.float64)
    ridge = Ridge(4, 3)
    ridge.add(z[:50], t[:50], rw[:50] if weighted else None)
    ridge.add(z[50:], t[50:], rw[50:] if weighted else None)
    solved = ridge.solve(torch.zeros(3, 4), None, strength=0.1)
    other = (torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64))
    for w, b in (solved, other, (other[0], None)):
        residual = z @ w.T + (0 if b is None else b) - t
        want = (rw[:, None] * residual.pow(2)).sum() / (rw[:, None] * t.pow(2)).sum()
        assert ridge.error(w, b) == pytest.approx(float(want), rel=1e-9)
    assert ridge.error(*solved) < ridge.error(*other)


def _fit(z, t, rw, prior, strength):
    """Brute force: weighted ridge least squares of [W b] towards ``prior`` (d_out, d_in + 1), bias free, by lstsq."""
    za = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], 1)
    lam = strength * (rw[:, None] * z * z).sum(0).mean()
    n = z.shape[1]
    penalty = torch.cat([lam.sqrt() * torch.eye(n, dtype=z.dtype), torch.zeros(n, 1, dtype=z.dtype)], 1)
    return torch.linalg.lstsq(torch.cat([rw.sqrt()[:, None] * za, penalty]),
                              torch.cat([rw.sqrt()[:, None] * t, lam.sqrt() * prior[:, :-1].T])).solution  # (n+1, out)


@pytest.mark.parametrize("noise, prior_off, want", [(0.1, None, "weaker"), (1.0, 0.5, "inside"),
                                                    (3.0, 0.0, "stronger")])
def test_the_compensations_ridge_strength_is_the_one_that_predicts_the_held_out_fold_best(noise, prior_off, want):
    """Batches alternate between two folds; each strength is fitted on one fold and scored on the other (brute-force
    weighted least squares here), and the least total held-out error wins. Nearly clean data and a wrong prior:
    weaker than the grid's weakest; noisy rows and a prior near the truth: a strength inside the grid; few noisy rows
    and the right prior: stronger than the grid's strongest. Past an end of the grid the search steps on at the
    grid's ratio while the held-out error falls."""
    gen = torch.Generator().manual_seed(2)
    d_in, d_out = 6, 4
    truth = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    if prior_off is None:  # a wrong prior
        prior = torch.zeros(d_out, d_in, dtype=torch.float64)
    elif prior_off:  # near the truth
        prior = truth + prior_off * torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    else:  # the truth
        prior = truth
    ridge, rows = Ridge(d_in, d_out, folds=2), {0: [], 1: []}
    for i in range(4):  # four batches of 5 rows
        z = torch.randn(5, d_in, generator=gen, dtype=torch.float64)
        t = z @ truth.T + 0.5 + noise * torch.randn(5, d_out, generator=gen, dtype=torch.float64)
        rw = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
        ridge.add(z, t, rw, batch=i)
        rows[i % 2].append((z, t, rw))
    folds = {f: [torch.cat(c) for c in zip(*rows[f])] for f in (0, 1)}
    prior_b = torch.cat([prior, torch.zeros(d_out, 1, dtype=torch.float64)], 1)

    def held_out(strength):
        total = 0.0
        for f in (0, 1):
            a = _fit(*folds[1 - f], prior_b, strength)
            z, t, rw = folds[f]
            residual = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], 1) @ a - t
            total += float((rw[:, None] * residual.pow(2)).sum())
        return total

    chosen = ridge.cross_validated(prior, None)
    ratio = 10 ** 0.5  # STRENGTHS: 0.01 to 100 in 9 steps
    beyond = {"weaker": [STRENGTHS[0] * ratio ** -k for k in range(1, BEYOND + 1)], "inside": [],
              "stronger": [STRENGTHS[-1] * ratio ** k for k in range(1, BEYOND + 1)]}[want]
    walk = [STRENGTHS[0] if want == "weaker" else STRENGTHS[-1]] + beyond  # the end that wins, and past it
    if want == "inside":
        assert chosen == min(STRENGTHS, key=held_out) and STRENGTHS[0] < chosen < STRENGTHS[-1], chosen
    else:
        taken = next(k for k, s in enumerate(walk) if s == pytest.approx(chosen, rel=1e-2))  # rounded to 3 digits
        assert taken > 0 and all(held_out(a) > held_out(b) for a, b in zip(walk[:taken], walk[1:taken + 1]))
        assert taken == BEYOND or held_out(walk[taken + 1]) >= held_out(walk[taken])  # stopped where it stops falling
    assert held_out(chosen) <= min(held_out(s) for s in STRENGTHS) * (1 + 1e-12)  # lstsq: not bitwise repeatable
    assert Ridge(d_in, d_out).cross_validated(prior, None) == STRENGTHS[0]  # one fold: nothing held out


def test_the_compensation_reports_the_strength_it_chose(tmp_path):
    plan = sequential(tiny_model("bert"), 4, calibration(), compensate=True)
    chosen = [r["compensation_strength"] for r in plan.reports]
    assert all(s in STRENGTHS or 0 < s < STRENGTHS[0] or s > STRENGTHS[-1] for s in chosen), chosen  # or past an end


def test_spill_round_trips_and_renames(tmp_path):
    spill = Spill(tmp_path)
    x = torch.randn(2, 3, 4)
    spill.write("x_next", 0, x)
    spill.rename("x_next", "x", 1)
    assert torch.equal(spill.read("x", 0, "cpu"), x) and [p.name for p in tmp_path.iterdir()] == ["x-0.safetensors"]


def test_the_temporary_activations_are_removed(tmp_path):
    sequential(tiny_model("bert"), 4, calibration(2))
    model = tiny_model("bert")
    config = ReductionConfig(key_dim=4, n_iter_max=5)
    reduce_sequential_(model, config, [4, 4], calibration(2), Plan(), workdir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    assert all(type(m).__name__.startswith("Collaborative") for _, _, m in attention_modules(model))


def test_the_refinement_step_warms_up_over_the_first_pass_then_halves_after_each_pass_that_loses_ground():
    schedule = StepSchedule(batches=4)
    factors = []
    for losses in ([4, 3, 2, 1], [1, 1, 1, 1], [2, 2, 2, 2], [1, 1, 1, 1], [float("nan")] * 4, [1, 1, 1, 1]):
        for loss in losses:
            factors.append(schedule.factor)
            schedule.record(loss)
    assert factors == [0.25, 0.5, 0.75, 1.0] + [1.0] * 4 + [1.0] * 4 + [0.5] * 4 + [0.5] * 4 + [0.25] * 4


def test_the_refinement_takes_its_steps_at_the_sizes_the_schedule_gives(monkeypatch):
    """Adam's step sizes, per parameter: the base size (relative to the parameter's RMS) times the schedule's factor,
    a quarter of it on the first of four batches."""
    sizes = []
    step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        sizes.append([group["lr"] for group in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    sequential(tiny_model("bert"), 4, calibration(4), refine_steps=5, refine_lr=1e-3)
    first, full = torch.tensor(sizes[0]), torch.tensor(sizes[3])
    torch.testing.assert_close(first, full / 4)
    assert sizes[4] == sizes[3] and all(s > 0 for s in sizes[3])


@pytest.mark.parametrize("compensate", [False, True], ids=["plain", "compensated"])
def test_refinement_that_diverges_gives_the_closed_form_back(compensate):
    """A step size far too large for the model: the Adam steps raise the error, so they are undone, and with
    compensation the output projection's refit to the diverged scores as well."""
    batches = calibration()
    refined, closed_form = tiny_model("bert"), tiny_model("bert")
    plan = sequential(refined, 4, batches, refine_steps=20, refine_lr=1e3, compensate=compensate)
    sequential(closed_form, 4, batches, compensate=compensate)
    assert [r["refined"] for r in plan.reports] == [False, False]
    assert all(r["output_error_after"] == r["output_error_before"] for r in plan.reports)
    for (name, a), b in zip(refined.named_parameters(), closed_form.parameters()):
        assert torch.equal(a, b), name


def test_refinement_leaves_no_gradients_behind():
    """A float32 layer's refined parameters kept their last .grad: memory held after the reduction, and carried by a
    pickled model. The steps are the same, so the weights are too."""
    model = tiny_model("bert")
    plan = sequential(model, 4, calibration(), refine_steps=10, refine_lr=1e-2)
    assert all(r["refined"] for r in plan.reports), plan.reports
    assert [name for name, p in model.named_parameters() if p.grad is not None] == []


def test_refinement_steps_run_by_the_formula_on_cpu_and_the_model_keeps_its_fast_path(monkeypatch):
    """Autograd through sdpa's CPU kernel (q, k and v padded to one width) took 1.3-1.6x the formula's time per step
    (benchmarks/refine_step.py): the steps run by the formula, and the reduced model still runs sdpa afterwards."""
    from mhacompress.reduction.modeling import attention, attention_modules

    fast = []  # whether autograd recorded, per call of the fast path
    real = attention.attend
    monkeypatch.setattr(attention, "attend", lambda module, *a, **k: fast.append(torch.is_grad_enabled()) or real(
        module, *a, **k))
    model = tiny_model("bert", attn="sdpa")
    plan = sequential(model, 4, calibration(), refine_steps=10, refine_lr=1e-2)
    assert all(r["refined"] for r in plan.reports), plan.reports
    assert fast and not any(fast)  # the closed-form passes ran sdpa; no step (with gradients) did
    assert not any(getattr(m, "by_formula", False) for *_, m in attention_modules(model))
    fast.clear()
    with torch.no_grad():
        model(**padded_batch())
    assert fast == [False, False]  # one sdpa call a layer after the reduction


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_refinement_lowers_the_output_error_of_a_half_precision_model(dtype):
    """Adam on float16 parameters: the squared gradients underflow (its eps, 1e-8, is 0 in float16), the steps are
    NaN, and every layer came back ``refined: false`` after all its steps; bfloat16 rounded small steps away. The
    steps run on a float32 copy of the layer; the model stays in its dtype, changed in the refined parameters only."""
    model, batches = tiny_model("bert").to(dtype), calibration()
    closed_form = tiny_model("bert").to(dtype)
    plan = sequential(model, 4, batches, refine_steps=40, refine_lr=1e-2)
    sequential(closed_form, 4, batches)
    assert all(r["refined"] and r["output_error_after"] < r["output_error_before"] for r in plan.reports), plan.reports
    refined = ("query_proj.weight", "key_proj.weight", "content_bias.weight", "mixing")
    for (name, a), b in zip(model.named_parameters(), closed_form.parameters()):
        assert a.dtype == dtype and a.grad is None, name
        assert not torch.equal(a, b) if name.endswith(refined) else torch.equal(a, b), name


def test_a_half_precision_layers_error_is_summed_in_float32():
    """Over one large batch (64 sequences of 60 tokens, 32 values each) the squared residuals add up past float16's
    largest number, 65504: summed in float16, the error before the steps was inf (or the ratio 0), and no step could
    lower it."""
    model = tiny_model("bert").to(torch.float16)
    plan = sequential(model, 4, [padded_batch(lengths=(60,) * 64)], refine_steps=10, refine_lr=1e-2)
    assert all(r["refined"] and 0 < r["output_error_after"] < r["output_error_before"] < 1 for r in plan.reports), \
        plan.reports


@pytest.mark.parametrize("first_token", [False, True], ids=["every-token", "first-token"])
def test_the_refinement_loss_from_cached_values_is_the_layers_weighted_output_error(tmp_path, first_token):
    """What a refinement step minimises, computed from the spilled value heads at the positions that carry weight,
    equals the layer's whole weighted output error; a head that reads the first token alone needs one position."""
    model, cpu = tiny_model("bert"), torch.device("cpu")
    data = [Batch(b, b["attention_mask"].bool()) for b in calibration(n=3)]
    last = 1
    with torch.no_grad():
        spill = embed(model, data, tmp_path)
        at = layer_at(model, last, token_weights(model, data, spill, first_token, cpu, lambda *a: None)[last])
        for index in range(last):  # the original's inputs to the last layer (the reduced stream is still equal)
            layer_statistics(model, index, layer_at(model, index, at.weights), data, spill, True, True, Plan(), cpu,
                             lambda *a: None)
            spill.rename("x_next", "x", len(data))
        moments = layer_statistics(model, last, at, data, spill, True, True, Plan(), cpu, lambda *a: None)
        solve_qk_(model, last, ReductionConfig(key_dim=4, n_iter_max=30), 4, moments, identity=True)
        loss = RefinementLoss(attention_modules(model)[last][2], at, data, spill, True, cpu, False)
        for i, batch in enumerate(data):
            args, kwargs = spill.read_call(i, cpu)
            x, target = spill.read("x", i, cpu), spill.read("s", i, cpu)
            w = at.query_weights(i)[batch.tokens][:, None]
            out = run_until(at.layer, at.norm, x, args, kwargs)
            whole = (w * (out - target)[batch.tokens].pow(2)).sum() / (w * (target - x)[batch.tokens].pow(2)).sum()
            assert float(loss(i)) == pytest.approx(float(whole), rel=1e-5)
            assert loss.positions[i].tolist() == ([0] if first_token else list(range(batch.tokens.shape[1])))


def test_without_token_weights_a_classifiers_last_layer_is_fitted_at_its_first_token_alone():
    """The score objective has no token weights: its rows are every real token, except in a classifier's last layer,
    whose head reads the first token only (the moments, the compensation and the refinement alike)."""
    model, encoding = tiny_model("bert"), padded_batch(lengths=(5, 3))
    batch = Batch(encoding, encoding["attention_mask"].bool())
    classifier = [layer_at(model, i, None, first_token_last=True) for i in range(2)]
    assert [at.first_only for at in classifier] == [False, True]
    assert not layer_at(model, 1, None).first_only  # an encoder reads every token of its last layer
    first = torch.zeros_like(batch.tokens, dtype=torch.float32)
    first[:, 0] = 1
    assert torch.equal(row_weights(classifier[1], 0, batch), first)
    assert torch.equal(row_weights(classifier[0], 0, batch), batch.tokens.float())
    weights = [torch.rand(batch.tokens.shape)]  # the output objective's token weights decide, at real tokens only
    at = layer_at(model, 1, weights, True)
    at.gains[0] = torch.full(batch.tokens.shape, 2.0)
    assert torch.equal(row_weights(at, 0, batch), 2 * weights[0] * batch.tokens)


def test_the_output_objective_weighs_each_token_by_its_rollout_weight_times_the_layernorms_gain(tmp_path):
    """Pass 1 measures the gain of the LayerNorm after the attention on the original residual sums (the next layer
    reads them normalised); the moments, the compensation and the refinement then weigh each token by rollout weight
    x gain."""
    model, cpu = tiny_model("bert"), torch.device("cpu")
    data = [Batch(b, b["attention_mask"].bool()) for b in calibration(n=2)]
    with torch.no_grad():
        spill = embed(model, data, tmp_path)
        rolled = token_weights(model, data, spill, False, cpu, lambda *a: None)[0]
        at = layer_at(model, 0, rolled)
        moments = layer_statistics(model, 0, at, data, spill, True, True, Plan(), cpu, lambda *a: None)
    total = 0.0
    for i, batch in enumerate(data):
        s = spill.read("s", i, cpu)
        expected = rolled[i] / (s.var(-1, unbiased=False) + at.norm.eps) * batch.tokens
        torch.testing.assert_close(row_weights(at, i, batch), expected)
        total += float(expected.sum())
    assert moments.n == pytest.approx(total, rel=1e-5)


def test_the_reduction_keeps_no_fused_copy_of_a_layers_weights_and_inference_builds_it_again():
    model = tiny_model("bert", attn="sdpa")
    batches = calibration()
    sequential(model, 4, batches)
    modules = [m for _, _, m in attention_modules(model)]
    assert all("_fused" not in m.__dict__ for m in modules)  # a copy of Q, K, content bias and V per layer
    with torch.no_grad():
        model(**batches[0])
    assert all("_fused" in m.__dict__ for m in modules)


@pytest.mark.parametrize("first_token_last", [False, True], ids=["encoder", "classifier"])
def test_the_score_objectives_query_moment_of_a_classifiers_last_layer_is_taken_at_first_tokens(tmp_path,
                                                                                                first_token_last):
    """Pass 1 under the score objective: the key moment covers every real token, the query moment the positions the
    model reads from the layer's output, the first token alone in a classifier's last layer."""
    model, cpu, last = tiny_model("bert"), torch.device("cpu"), 1
    data = [Batch(b, b["attention_mask"].bool()) for b in calibration(n=2)]
    plan, quiet = Plan(objective="score"), lambda *a: None
    with torch.no_grad():
        spill = embed(model, data, tmp_path)
        layer_statistics(model, 0, layer_at(model, 0, None, first_token_last), data, spill, True, False, plan, cpu,
                         quiet)
        spill.rename("x_next", "x", len(data))
        moments = layer_statistics(model, last, layer_at(model, last, None, first_token_last), data, spill, True,
                                   False, plan, cpu, quiet)
    xs = [spill.read("x", i, cpu).double() for i in range(len(data))]
    tokens = torch.cat([x[b.tokens] for x, b in zip(xs, data)])  # (N, d)
    queries = torch.cat([x[:, 0] for x in xs]) if first_token_last else tokens
    as_float32 = dict(rtol=1.3e-6, atol=1e-5)  # each batch's sums are taken in float32 (LayerMoments.add)
    torch.testing.assert_close(moments.key_moment(), tokens.T @ tokens / len(tokens), **as_float32)
    torch.testing.assert_close(moments.query_moment(), queries.T @ queries / len(queries), **as_float32)
