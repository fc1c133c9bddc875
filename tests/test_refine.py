"""Layer-local refinement: fits each reduced layer to the original layer's outputs, deterministically."""

import torch

from conftest import padded_batch, tiny_model
from mhacompress.compress.calibrate import second_moments
from mhacompress.compress.config import ReductionConfig
from mhacompress.compress.refine import input_moments, output_error, record_calls, refine_
from mhacompress.compress.surgery import reduce_


def reduced_and_calls(seed=0):
    model = tiny_model("bert")
    batches = [padded_batch(lengths=(9, 4, 7, 1), seed=s) for s in range(3)]
    calls = record_calls(model, batches)
    reduce_(model, ReductionConfig(key_dim=8), moments=second_moments(model, batches))
    return model, calls, batches


def test_recorded_outputs_are_the_original_layers_outputs():
    model = tiny_model("bert")
    batch = padded_batch()
    calls = record_calls(model, [batch])
    with torch.no_grad():
        x = model.embeddings(input_ids=batch["input_ids"])
    assert len(calls) == 2 and len(calls[0]) == 1
    torch.testing.assert_close(calls[0][0].args[0] if calls[0][0].args else calls[0][0].kwargs["hidden_states"], x)


def test_recorded_calls_give_the_calibration_moments_without_a_second_pass():
    model = tiny_model("bert")
    batches = [padded_batch(lengths=(9, 4, 7, 1), seed=s) for s in range(3)]
    for got, want in zip(input_moments(record_calls(model, batches)), second_moments(model, batches), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_refinement_lowers_every_layers_output_error():
    model, calls, _ = reduced_and_calls()
    report = refine_(model, calls, steps=60, lr=1e-2)
    assert all(r["output_error_after"] < r["output_error_before"] for r in report), report
    assert not any(p.requires_grad is False for p in model.parameters())  # trainability restored as it was
    assert not any(m.training for m in model.modules())


def test_refinement_is_deterministic():
    a, calls_a, _ = reduced_and_calls()
    b, calls_b, _ = reduced_and_calls()
    refine_(a, calls_a, steps=10, seed=3)
    refine_(b, calls_b, steps=10, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_output_error_is_zero_at_full_key_dim():
    model = tiny_model("bert")
    batch = padded_batch()
    calls = record_calls(model, [batch])
    reduce_(model, ReductionConfig(key_dim=32))
    from mhacompress.compress.modeling import attention_modules

    errors = [output_error(m, c) for (_, _, m), c in zip(attention_modules(model), calls)]
    assert max(errors) < 1e-5
