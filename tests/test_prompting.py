"""The dialogue prompt (FROMAGe's Q:/A: lines) and fitting a long dialogue to the LLM's positions."""
import pytest
import torch

from unimur.inference.prompting import PromptBuilder, candidate_text, layout, speaker_marks

IMG = torch.zeros(4)


def test_speaker_marks_alternate_so_that_the_response_is_an_answer():
    assert speaker_marks(1) == ["Q: "]
    assert speaker_marks(4) == ["A: ", "Q: ", "A: ", "Q: "]


def test_dialogue_layout_reads_as_fromage_prompts_it():
    turns = [["hi there"], ["look", IMG, "my cat"], [IMG], ["can you show me one?"]]
    pieces = layout(turns, "dialogue")
    text = "".join(p if isinstance(p, str) else "<img>" for p in pieces)
    assert text == "A: hi there\nQ: look<img> my cat\nA:<img>\nQ: can you show me one?\nA:"
    assert sum(not isinstance(p, str) for p in pieces) == 2  # images stay pieces, in their place
    assert candidate_text("sure, here", "dialogue") == " sure, here"


def test_flat_layout_is_the_pieces_in_order():
    turns = [["hi there"], ["look", IMG]]
    assert layout(turns, "flat") == ["hi there", "look", IMG]
    assert candidate_text("sure", "flat") == "sure"
    with pytest.raises(ValueError, match="prompt style"):
        layout(turns, "chat")


def test_a_long_dialogue_loses_its_oldest_whole_turns_first():
    builder = PromptBuilder("dialogue", max_tokens=12, count_text=lambda s: len(s.split()), image_tokens=2)
    turns = [["one two three four"], ["five", IMG], ["six seven"]]
    fitted = builder.build(turns, reserve=1)
    # whole: "A: one two three four" (5) "\nQ: five" (2) img (2) "\nA: six seven" (3) "\nA:" (1) = 13 > 11
    assert fitted.turns_dropped == 1 and fitted.cut
    assert fitted.pieces == layout(turns[1:], "dialogue")  # the image went with nothing of turn 1
    assert builder.length(fitted.pieces) <= 12 - 1
    assert builder.build(turns, reserve=0).turns_dropped == 1
    roomy = PromptBuilder("dialogue", max_tokens=100, count_text=lambda s: len(s.split()))
    assert roomy.build(turns, reserve=30) == type(fitted)(layout(turns, "dialogue"), 0, False)


def test_a_single_turn_too_long_is_kept_and_counted_as_cut():
    builder = PromptBuilder("flat", max_tokens=3, count_text=lambda s: len(s.split()))
    fitted = builder.build([["a b c d e f"]], reserve=1)
    assert fitted.turns_dropped == 0 and fitted.cut and fitted.pieces == ["a b c d e f"]
