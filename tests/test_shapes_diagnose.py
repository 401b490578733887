"""The prompt-sensitivity diagnosis of the ShapesWorld README section."""

from __future__ import annotations

from ospo.shapes import diagnose


def test_rotations_edit_every_colour_and_shape_word():
    assert diagnose.rotate_colors("a red circle and two yellow squares") == "a green circle and two red squares"
    assert diagnose.rotate_shapes("a red circle and two yellow squares") == "a red square and two yellow triangles"
    assert diagnose.rotate_colors("three circles") == "three circles"      # nothing to rotate: not counted


def test_the_shipped_model_reads_its_prompt_teacher_forced():
    res = diagnose.main(["--n", "16"])
    assert res["n"] == 16 and res["colors_rotated"]["n"] <= 16
    # the right prompt explains the image better than another scene's, or than no prompt
    assert res["right"] > res["other_scene"]["edited"] + 0.1
    assert res["right"] > res["unconditional"]
    assert res["other_scene"]["right_higher"] > 0.9
