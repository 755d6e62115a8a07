"""The selection arithmetic against brute-force loops, and its properties under hypothesis."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memedit.selection import aggregate_steps, select_layer, select_step, select_step_neurons


def brute_select_step(w, a_mem, a_ref, k):
    out_f, in_f = w.shape
    count = math.floor(k * in_f + 1e-9)
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    for i in range(out_f):
        scores = [(abs(float(w[i, j])) * float(a_mem[j]), j) for j in range(in_f)]
        top = sorted(scores, reverse=True)[:count]
        for s_mem, j in top:
            if s_mem > abs(float(w[i, j])) * float(a_ref[j]):
                mask[i, j] = True
    return mask


def brute_select_layer(w, norms_mem, norms_ref, k, tau, rho):
    calls = min(tau, norms_mem.shape[0])
    counts = torch.zeros(w.shape, dtype=torch.int64)
    for t in range(calls):
        counts += brute_select_step(w, norms_mem[t], norms_ref[t], k).long()
    return counts > rho * calls


def distinct(shape, seed):
    # Continuous random values: scores tie with probability zero (a tie makes top-k ambiguous,
    # and then any answer is right).
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5).float()


@settings(max_examples=40, deadline=None)
@given(out_f=st.integers(1, 6), in_f=st.integers(1, 24), k=st.floats(0.01, 1.0),
       seed=st.integers(0, 10_000))
def test_select_step_matches_brute_force(out_f, in_f, k, seed):
    w = distinct((out_f, in_f), seed)
    a_mem = distinct((in_f,), seed + 1).abs()
    a_ref = distinct((in_f,), seed + 2).abs()
    assert torch.equal(select_step(w, a_mem, a_ref, k), brute_select_step(w, a_mem, a_ref, k))


@settings(max_examples=25, deadline=None)
@given(calls=st.integers(1, 5), tau=st.integers(1, 6), rho=st.sampled_from([0.0, 0.3, 0.6]),
       k=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_select_layer_matches_brute_force(calls, tau, rho, k, seed):
    w = distinct((4, 12), seed)
    norms_mem = distinct((calls, 12), seed + 1).abs()
    norms_ref = distinct((calls, 12), seed + 2).abs()
    expected = brute_select_layer(w, norms_mem, norms_ref, k, tau, rho)
    assert torch.equal(select_layer(w, norms_mem, norms_ref, k, tau, rho), expected)


@settings(max_examples=40, deadline=None)
@given(out_f=st.integers(1, 8), in_f=st.integers(1, 32), k=st.floats(0.01, 1.0),
       seed=st.integers(0, 10_000))
def test_select_step_properties(out_f, in_f, k, seed):
    w = distinct((out_f, in_f), seed)
    a_mem = distinct((in_f,), seed + 1).abs()
    a_ref = distinct((in_f,), seed + 2).abs()
    mask = select_step(w, a_mem, a_ref, k)
    # Never more than floor(k * in) per row, and only where memorized prompts score higher.
    assert int(mask.sum(dim=1).max()) <= math.floor(k * in_f + 1e-9)
    assert not (mask & ~(w.abs() * a_mem > w.abs() * a_ref)).any()
    # A reference that activates nothing leaves exactly the top-k per row.
    full = select_step(w, a_mem, torch.zeros(in_f), k)
    assert torch.equal(full.sum(dim=1), torch.full((out_f,), math.floor(k * in_f + 1e-9)))


@settings(max_examples=25, deadline=None)
@given(calls=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_aggregate_monotone_in_rho(calls, seed):
    g = torch.Generator().manual_seed(seed)
    masks = [torch.rand(5, 7, generator=g) > 0.6 for _ in range(calls)]
    union = aggregate_steps(masks, calls, 0.0)
    assert torch.equal(union, torch.stack(masks).any(dim=0))
    previous = union
    for rho in (0.2, 0.5, 0.8):
        current = aggregate_steps(masks, calls, rho)
        assert not (current & ~previous).any()
        previous = current


def test_neuron_variant_selects_whole_columns():
    w = distinct((6, 10), 3)
    a_mem = torch.linspace(1, 2, 10)
    a_ref = torch.ones(10)
    a_ref[9] = 5.0  # the strongest memorized column is stronger still on reference prompts
    mask = select_step_neurons(w, a_mem, a_ref, 0.3)
    columns = mask.any(dim=0)
    assert torch.equal(mask, columns.unsqueeze(0).expand_as(mask))
    assert int(columns.sum()) <= 3 and not columns[9]


def test_k_too_small_for_a_layer_selects_nothing():
    w = distinct((3, 8), 0)
    assert not select_step(w, torch.ones(8), torch.zeros(8), 0.1).any()
