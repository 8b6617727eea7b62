"""IncrementalDetokenizer's stop strings against a brute-force reference: the text it cuts, what a
stream may show at every step, whatever the chunking, overlaps and re-decoded tails."""

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.detokenizer import IncrementalDetokenizer


class ScriptedTokenizer:
    """decode() of the first k "ids" returns the k-th scripted text: any growth, re-decodes included."""

    def __init__(self, texts: list[str]):
        self.texts = texts

    def decode(self, ids, skip_special_tokens=True):
        return self.texts[len(ids) - 1]


def reference(texts: list[str], stops: tuple[str, ...]) -> tuple[str, list[int]]:
    """The final text and the safe length after each step, by the definitions, quadratically."""
    safe_lengths = []
    for text in texts:
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[: min(hits)], safe_lengths
        safe = len(text.rstrip("\ufffd"))
        held = max((k for s in stops for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
        safe_lengths.append(safe - held)
    return texts[-1], safe_lengths


alphabet = st.sampled_from("ab\ufffd")
word = st.text(alphabet, min_size=1, max_size=6)


@st.composite
def scripts(draw):
    """Growing texts, where a step may also rewrite the last few characters (a completed U+FFFD)."""
    texts, text = [], ""
    for _ in range(draw(st.integers(1, 12))):
        keep = len(text) - draw(st.integers(0, min(2, len(text))))
        text = text[:keep] + draw(st.text(alphabet, min_size=1, max_size=4))
        texts.append(text)
    return texts


@settings(max_examples=400, deadline=None)
@given(scripts(), st.lists(word, min_size=1, max_size=4).map(tuple))
def test_stop_strings_match_the_brute_force_reference(texts, stops):
    detok = IncrementalDetokenizer(ScriptedTokenizer(texts), stops)
    expected_text, expected_safe = reference(texts, stops)
    for step in range(len(texts)):
        detok.update(list(range(step + 1)))
        if detok.stopped:
            break
        detok.delta(final=False)
        # What a stream has been shown: the reference's safe length, never less than before.
        assert detok.emitted == max([0, *expected_safe[: step + 1]])
    assert detok.text == expected_text
    assert detok.stopped == any(s in t for t in texts for s in stops)


def test_a_stop_string_split_across_steps_is_held_back_then_cut():
    detok = IncrementalDetokenizer(ScriptedTokenizer(["x ST", "x STO", "x STOP tail"]), ("STOP",))
    detok.update([0])
    assert detok.delta(final=False) == "x "
    detok.update([0, 1])
    assert detok.delta(final=False) == ""
    detok.update([0, 1, 2])
    assert detok.stopped and detok.text == "x " and detok.delta(final=True) == ""


def test_a_long_stop_string_costs_per_step_what_the_step_adds():
    """The automaton reads each new character once: after 2000 one-character steps against a
    1024-character stop string, it has stored one state per character and nothing more."""
    stop = "a" * 1023 + "b"
    texts = ["a" * (i + 1) for i in range(2000)]
    detok = IncrementalDetokenizer(ScriptedTokenizer(texts), (stop,))
    for step in range(len(texts)):
        detok.update(list(range(step + 1)))
        assert detok.delta(final=False) == ("a" if step >= 1023 else "")
    (matcher,) = detok.matchers
    assert len(matcher.states) == 2001 and not detok.stopped
