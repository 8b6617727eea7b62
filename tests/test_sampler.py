"""The batched sampler against a per-row, plain-torch reference, with several settings in one batch.

Every batch mixes rows with different settings, so a test fails if one row's settings leak into
another's (the sampler vectorises across rows). References loop over rows and tokens in float64.
"""

import math

import pytest
import torch

from engine.core.sampler import Sampler, apply_penalties, block_early_stop, token_counts, truncate
from engine.core.sequence import Sequence
from engine.sampling_params import SamplingParams

CPU = torch.device("cpu")
VOCAB = 64
EOS = (2, 3)  # two EOS ids, as Llama-3 style models have

# What each comparison allows, and why.
TOLERANCES = {
    "logits": 1e-5,  # float32 penalties vs the float64 reference, logits of magnitude ~5
    "logprob": 1e-6,  # the sampler's float32 log-softmax vs torch's, as the API reports them
    "frequency": 0.015,  # empirical vs exact probability from 20,000 draws (~4 standard deviations)
}


def _seq(prompt: list[int], output: list[int] = (), seed: int | None = None, **params) -> Sequence:
    """A Sequence holding prompt + output tokens; with `seed`, its own generator as the engine gives it."""
    seq = Sequence(0, 0, list(prompt) + list(output), len(prompt), SamplingParams(seed=seed, **params))
    if seed is not None:
        seq.generator = torch.Generator().manual_seed(seed)
    return seq


def _logits(rows: int, seed: int, scale: float = 2.0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# --- references, one row at a time ------------------------------------------------------------


def _penalised_ref(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """CTRL/HF repetition penalty over prompt + output, then OpenAI presence/frequency over the output."""
    p, out = seq.params, row.double().clone()
    output = seq.output_token_ids
    for t in set(seq.token_ids):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.presence_penalty + p.frequency_penalty * output.count(t)
    return out


def _banned_ref(seq: Sequence, eos: tuple[int, ...]) -> set[int]:
    p = seq.params
    if seq.num_output_tokens >= p.min_tokens:
        return set()
    return set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos))


def _kept_ref(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Top-k; then the smallest prefix of the top-k-renormalised distribution with mass >= top_p; then min-p."""
    row = row.double()
    order = [t for t in sorted(range(len(row)), key=lambda t: -row[t].item()) if row[t] > -math.inf]
    kept = order[:top_k] if top_k > 0 else order
    if top_p < 1:
        z = sum(math.exp(row[t].item() - row[kept[0]].item()) for t in kept)
        nucleus, mass = [], 0.0
        for t in kept:
            nucleus.append(t)
            mass += math.exp(row[t].item() - row[kept[0]].item()) / z
            if mass >= top_p:
                break
        kept = nucleus
    if min_p > 0:  # p_t / p_top = exp(l_t - l_top) whatever the normalisation
        kept = [t for t in kept if math.exp(row[t].item() - row[kept[0]].item()) >= min_p]
    return set(kept)


def _probs_ref(raw: torch.Tensor, seq: Sequence, eos: tuple[int, ...] = EOS) -> torch.Tensor:
    """The distribution a sampling row draws from: penalties, bans, temperature, truncation."""
    p = seq.params
    logits = _penalised_ref(raw, seq)
    for t in _banned_ref(seq, eos):
        logits[t] = -math.inf
    logits = logits / p.temperature
    kept = _kept_ref(logits, p.top_k, p.top_p, p.min_p)
    probs = torch.zeros_like(logits)
    idx = torch.tensor(sorted(kept))
    probs[idx] = logits[idx].softmax(-1)
    return probs


# --- token_counts and penalties ----------------------------------------------------------------


def test_token_counts_counts_repeats_and_handles_empty_lists():
    """Frequency penalties scale with these counts; an empty output must count nothing."""
    counts = token_counts([[1, 1, 4], [], [0, 4, 4, 4]], 5, CPU)
    assert torch.equal(counts, torch.tensor([[0, 2, 0, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 3.0]]))


PROMPT = [5, 9, 9, 12, 30, 41]
OUTPUT = [9, 7, 7, 7, 50, 12, 63]

# Rows of (params, output); each batch mixes settings row by row.
PENALTY_BATCHES = {
    "repetition": [(dict(repetition_penalty=1.3), OUTPUT), (dict(repetition_penalty=0.7), OUTPUT),
                   (dict(repetition_penalty=2.0), [])],
    "presence": [(dict(presence_penalty=0.8), OUTPUT), (dict(presence_penalty=-1.5), OUTPUT[:3]),
                 (dict(presence_penalty=2.0), [])],
    "frequency": [(dict(frequency_penalty=0.5), OUTPUT), (dict(frequency_penalty=-0.3), OUTPUT),
                  (dict(frequency_penalty=1.0), [7, 7, 7, 7, 7])],
    "combined": [(dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.25), OUTPUT),
                 (dict(repetition_penalty=0.9, presence_penalty=-0.4, frequency_penalty=1.1), OUTPUT[2:])],
    "mixed": [(dict(), OUTPUT), (dict(repetition_penalty=1.5), OUTPUT), (dict(presence_penalty=1.0), OUTPUT[:4]),
              (dict(), []), (dict(frequency_penalty=0.7), OUTPUT),
              (dict(repetition_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.6), OUTPUT[1:])],
}


@pytest.mark.parametrize("batch", PENALTY_BATCHES.values(), ids=PENALTY_BATCHES.keys())
def test_penalties_match_reference(batch):
    """Per-row repetition (prompt + output), presence and frequency (output only) in one vectorised call."""
    seqs = [_seq(PROMPT, output, **params) for params, output in batch]
    logits = _logits(len(seqs), seed=1)
    before = logits.clone()
    seen = sorted(set(PROMPT) | set(OUTPUT))
    assert (logits[:, seen] > 0).any() and (logits[:, seen] < 0).any()  # both branches of the CTRL rule

    got = apply_penalties(logits, seqs)

    expected = torch.stack([_penalised_ref(row, s) for row, s in zip(logits, seqs)])
    torch.testing.assert_close(got.double(), expected, atol=TOLERANCES["logits"], rtol=0)
    assert torch.equal(logits, before)  # the caller's logits (used for raw logprobs) stay untouched
    assert not torch.equal(got, logits)


# --- min_tokens --------------------------------------------------------------------------------


# (params, number of output tokens so far)
MIN_TOKEN_ROWS = [
    (dict(min_tokens=3), 1),  # EOS banned
    (dict(min_tokens=3, stop_token_ids=(10, 11)), 2),  # EOS and stop ids banned
    (dict(min_tokens=3, stop_token_ids=(10,)), 3),  # reached: nothing banned
    (dict(min_tokens=4, stop_token_ids=(11,), ignore_eos=True), 0),  # stop id banned, EOS allowed
    (dict(stop_token_ids=(10, 11)), 0),  # min_tokens 0
    (dict(min_tokens=2, max_tokens=8), 5),
]


def test_min_tokens_blocks_eos_and_stop_ids():
    """EOS and stop ids cannot be chosen below min_tokens; ignore_eos keeps EOS allowed (stop ids still banned)."""
    seqs = [_seq([1, 4, 6], [20] * n, **params) for params, n in MIN_TOKEN_ROWS]
    logits = _logits(len(seqs), seed=2)

    got = block_early_stop(logits, seqs, EOS)

    for i, seq in enumerate(seqs):
        banned = _banned_ref(seq, EOS)
        allowed = [t for t in range(VOCAB) if t not in banned]
        assert torch.isneginf(got[i, sorted(banned)]).all(), f"row {i}"
        assert torch.equal(got[i, allowed], logits[i, allowed]), f"row {i}"
    assert [len(_banned_ref(s, EOS)) for s in seqs] == [2, 4, 0, 1, 0, 0]  # the rows cover each case


def test_min_tokens_changes_the_greedy_choice():
    """Through the Sampler: a row whose favourite is EOS or a stop id picks the best allowed token instead."""
    seqs = [_seq([1, 4, 6], [20] * n, temperature=0, **params) for params, n in MIN_TOKEN_ROWS]
    logits = _logits(len(seqs), seed=3)
    favourite = [2, 10, 10, 3, 11, 2]  # per row, an EOS or a stop id made the clear argmax
    logits[torch.arange(len(seqs)), favourite] = 50.0

    tokens, _ = Sampler(EOS, CPU, seed=0)(logits, seqs)

    for i, seq in enumerate(seqs):
        row = logits[i].clone()
        row[sorted(_banned_ref(seq, EOS))] = -math.inf
        assert tokens[i] == row.argmax().item(), f"row {i}"
    assert tokens[3] == 3  # ignore_eos: EOS stays allowed below min_tokens


# --- truncation --------------------------------------------------------------------------------

# (top_k, top_p, min_p) per row, all in one call.
TRUNCATE_ROWS = [
    (0, 1.0, 0.0),  # off
    (1, 1.0, 0.0),
    (7, 1.0, 0.0),
    (0, 0.5, 0.0),
    (0, 0.9, 0.0),
    (10, 0.8, 0.0),  # top-p over the top-10 distribution
    (0, 1.0, 0.1),
    (0, 1.0, 1.0),  # only the top token reaches 1 x the top probability
    (20, 0.95, 0.05),  # all three
    (VOCAB, 0.3, 0.0),  # k = vocab: top-k off
    (1000, 1.0, 0.2),  # k > vocab: top-k off
    (0, 0.01, 0.0),  # the top token alone
]


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_truncate_keeps_exactly_the_reference_set(scale):
    """Surviving tokens equal the reference set row by row; survivors keep their logits unchanged."""
    logits = _logits(len(TRUNCATE_ROWS), seed=4, scale=scale)
    top_k, top_p, min_p = map(list, zip(*TRUNCATE_ROWS))

    got = truncate(logits, top_k, top_p, min_p)

    sizes = []
    for i, row in enumerate(logits):
        kept = _kept_ref(row, top_k[i], top_p[i], min_p[i])
        sizes.append(len(kept))
        survivors = torch.isfinite(got[i]).nonzero().flatten().tolist()
        assert set(survivors) == kept, f"row {i} {TRUNCATE_ROWS[i]}"
        assert torch.equal(got[i, survivors], row[survivors])
    assert sizes[0] == VOCAB and sizes[1] == 1 and sizes[2] == 7 and 1 < sizes[4] < VOCAB


def test_top_p_is_taken_on_the_top_k_distribution():
    """Top-p reads the top-k-renormalised masses: raw masses would keep two tokens here, renormalised keep one."""
    probs = torch.tensor([0.5, 0.2] + [0.3 / 8] * 8)
    logits = probs.log()[None].repeat(2, 1)

    got = truncate(logits, [2, 0], [0.65, 0.65], [0.0, 0.0])

    assert torch.isfinite(got[0]).nonzero().flatten().tolist() == [0]  # 0.5 / 0.7 = 0.714 >= 0.65
    assert torch.isfinite(got[1]).nonzero().flatten().tolist() == [0, 1]  # without top-k: 0.5 < 0.65 <= 0.7


def test_top_p_one_keeps_every_token():
    """top_p = 1 means off: a row keeps its whole vocabulary (or exactly its top-k) whatever its neighbours ask."""
    row = torch.tensor([0.0, -5.0, -10.0, -17.0, -20.0, -30.0])
    logits = row[None].repeat(3, 1)

    got = truncate(logits, [0, 5, 0], [1.0, 1.0, 0.5], [0.0, 0.0, 0.0])

    assert torch.isfinite(got[0]).all()  # neighbour row 2 turned top-p on
    assert torch.isfinite(got[1]).sum() == 5  # top-k 5, top-p off


# --- the Sampler -------------------------------------------------------------------------------


def test_greedy_rows_take_the_argmax_of_penalised_logits_among_sampling_rows():
    """Temperature 0 rows ignore truncation and noise; sampling rows draw inside their own kept set."""
    rows = [
        (dict(temperature=0, repetition_penalty=3.0), OUTPUT),
        (dict(temperature=1.0, top_k=5), OUTPUT),
        (dict(temperature=0, frequency_penalty=2.0, top_k=3, top_p=0.1), OUTPUT),
        (dict(temperature=0.8, top_p=0.5, presence_penalty=1.0), OUTPUT),
        (dict(temperature=0), []),
        (dict(temperature=1.5, min_p=0.3), OUTPUT),
    ]
    seqs = [_seq(PROMPT, output, **params) for params, output in rows]
    logits = _logits(len(seqs), seed=5)
    logits[0, 9], logits[2, 7] = 8.0, 8.0  # favourites that only penalties dethrone

    tokens, logprobs = Sampler(EOS, CPU, seed=0)(logits, seqs)

    assert logprobs is None
    for i, seq in enumerate(seqs):
        if seq.params.greedy:
            assert tokens[i] == _penalised_ref(logits[i], seq).argmax().item(), f"row {i}"
        else:
            assert _probs_ref(logits[i], seq)[tokens[i]] > 0, f"row {i} drew a truncated token"
    assert tokens[0] != 9 and tokens[2] != 7  # the penalties mattered


def _run_seeded(batch_of_step, seed_row: Sequence, steps: int, sampler_seed: int) -> list[int]:
    """Sample `steps` tokens for seed_row among the neighbours batch_of_step(step) returns; append each."""
    sampler, got = Sampler(EOS, CPU, seed=sampler_seed), []
    for step in range(steps):
        neighbours = batch_of_step(step)
        seqs = neighbours[:1] + [seed_row] + neighbours[1:]
        row = seqs.index(seed_row)
        logits = _logits(len(seqs), seed=100 + step)
        logits[row] = _logits(1, seed=step, scale=1.0)[0]  # the seeded row's logits depend on the step only
        tokens, _ = sampler(logits, seqs)
        for seq, token in zip(seqs, tokens):
            seq.token_ids.append(token)
        got.append(tokens[row])
    return got


def test_seeded_row_is_independent_of_its_neighbours():
    """A request with a seed gets the same tokens alone, among unseeded rows, or among other seeded rows."""
    params = dict(temperature=1.0, presence_penalty=0.5)
    steps = 10

    def alone(step):
        return []

    neighbours_a = [_seq([1], temperature=1.0), _seq([1], temperature=0)]
    neighbours_b = [_seq([3, 3], seed=7, temperature=0.5), _seq([1], temperature=1.2, top_k=4),
                    _seq([2], temperature=1.0, repetition_penalty=1.3, min_p=0.1)]

    runs = [
        _run_seeded(alone, _seq(PROMPT, seed=42, **params), steps, sampler_seed=0),
        _run_seeded(lambda step: neighbours_a, _seq(PROMPT, seed=42, **params), steps, sampler_seed=1),
        _run_seeded(lambda step: neighbours_b[: 1 + step % 3], _seq(PROMPT, seed=42, **params), steps,
                    sampler_seed=2),
    ]
    other_seed = _run_seeded(alone, _seq(PROMPT, seed=43, **params), steps, sampler_seed=0)

    assert runs[0] == runs[1] == runs[2]
    assert len(set(runs[0])) > 3 and other_seed != runs[0]  # the tokens are drawn, not fixed


def test_unseeded_rows_follow_the_sampler_generator():
    """Rows without a seed draw from the Sampler's seed: the same seed repeats, another seed differs."""
    seqs = [_seq([1], temperature=1.0) for _ in range(32)]
    logits = _logits(32, seed=6, scale=0.5)

    a, _ = Sampler(EOS, CPU, seed=0)(logits, seqs)
    b, _ = Sampler(EOS, CPU, seed=0)(logits, seqs)
    c, _ = Sampler(EOS, CPU, seed=1)(logits, seqs)

    assert a == b and a != c


DRAWS = 20_000
SMALL_ROW = torch.tensor([2.0, 1.6, 1.2, 0.9, 0.5, 0.0, -0.4, -1.0, -2.0, -3.0])


@pytest.mark.parametrize("params", [
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.0, top_k=4),
    dict(temperature=1.5, min_p=0.3),
    dict(temperature=0.9, top_k=6, top_p=0.8, min_p=0.15),
], ids=["top_p", "top_k", "min_p", "all"])
def test_sampled_frequencies_match_reference_distribution(params):
    """20,000 draws of one row (repeated across the batch) follow the reference; truncated tokens never appear."""
    seqs = [_seq([1], **params) for _ in range(DRAWS)]
    expected = _probs_ref(SMALL_ROW, seqs[0])
    assert (expected == 0).any()  # truncation removes something
    for wrong in (SMALL_ROW.double().softmax(-1), (SMALL_ROW.double() / params["temperature"]).softmax(-1)):
        assert (expected - wrong).abs().max() > 2 * TOLERANCES["frequency"]  # skipping a stage would fail

    tokens, _ = Sampler(EOS, CPU, seed=0)(SMALL_ROW[None].repeat(DRAWS, 1), seqs)

    freq = torch.bincount(torch.tensor(tokens), minlength=len(SMALL_ROW)).double() / DRAWS
    assert freq[expected == 0].sum() == 0
    assert (freq - expected).abs().max() < TOLERANCES["frequency"], (freq, expected)


# --- logprobs ----------------------------------------------------------------------------------

LOGPROB_ROWS = [
    (dict(logprobs=5, temperature=0.8, repetition_penalty=1.5), OUTPUT),
    (dict(temperature=0, presence_penalty=2.0), OUTPUT),  # logprobs None
    (dict(logprobs=0, temperature=1.2, top_k=5), OUTPUT),
    (dict(logprobs=2, temperature=0, presence_penalty=2.0, frequency_penalty=2.0), OUTPUT),
    (dict(temperature=1.0), OUTPUT),  # logprobs None, seeded below
    (dict(logprobs=20, temperature=0.5, top_p=0.7), []),
]


def _logprob_batch(with_logprobs: bool) -> list[Sequence]:
    seqs = []
    for i, (params, output) in enumerate(LOGPROB_ROWS):
        params = dict(params) if with_logprobs else {k: v for k, v in params.items() if k != "logprobs"}
        seqs.append(_seq(PROMPT, output, seed=11 if i == 4 else None, **params))
    return seqs


def test_logprobs_are_raw_log_softmax_of_the_sampled_and_top_tokens():
    """Logprobs describe the model's own distribution (raw logits): the sampled token plus its top-k alternatives."""
    logits = _logits(len(LOGPROB_ROWS), seed=8)
    logits[3] *= 0.5
    logits[3, 7], logits[3, 50] = 4.0, 3.9  # row 3's raw top-2, which its penalties (-8, -4) dethrone
    raw = logits.double().log_softmax(-1)

    tokens, logprobs = Sampler(EOS, CPU, seed=0)(logits, _logprob_batch(True))
    plain_tokens, none = Sampler(EOS, CPU, seed=0)(logits, _logprob_batch(False))

    assert none is None and tokens == plain_tokens  # asking for logprobs does not change the draw
    assert len(logprobs) == len(LOGPROB_ROWS)
    for i, ((params, _), token, entry) in enumerate(zip(LOGPROB_ROWS, tokens, logprobs)):
        k = params.get("logprobs") or 0  # a row that did not ask still gets its sampled token
        top = raw[i].topk(k).indices.tolist() if k else []
        assert set(entry) == {token} | set(top), f"row {i}"
        for t, value in entry.items():
            assert abs(value - raw[i, t].item()) < TOLERANCES["logprob"], f"row {i} token {t}"
    assert tokens[3] not in (7, 50) and len(logprobs[3]) == 3  # a token outside the raw top-2, listed with them
    penalised = _penalised_ref(logits[0], _logprob_batch(True)[0]).log_softmax(-1)
    assert (penalised - raw[0]).abs().max() > 0.1  # processed logprobs would have failed
