"""Parsers and templates on fixed strings, malformed model output included."""

from ospo import parsing, templates


def test_prompt_list_accepts_labelled_pairs():
    text = ("Prompt: a red apple and a green cup\nObjects: apple, cup\n"
            "Prompt: two dogs near a bench.\nObjects: dogs, bench\n")
    acc, rej = parsing.parse_prompt_list(text)
    assert acc == [("a red apple and a green cup", ["apple", "cup"]), ("two dogs near a bench", ["dogs", "bench"])]
    assert rej == []


def test_prompt_list_rejects_with_reasons():
    text = ("Prompt: a cat on a sofa\nObjects: cat, table\n"   # table not in prompt
            "Prompt: a lonely prompt\n"                          # no objects line
            "Prompt: \nObjects: x\n"                              # empty
            "Prompt: a bus\nObjects: bus\n")
    acc, rej = parsing.parse_prompt_list(text)
    assert acc == [("a bus", ["bus"])]
    assert sorted(rej) == ["empty_prompt", "missing_objects", "object_not_in_prompt"]


def test_prompt_list_garbage_is_a_reason_not_a_crash():
    for junk in ["", "\x00\x01 ###", "Objects: a, b", "Prompt:"]:
        acc, rej = parsing.parse_prompt_list(junk)
        assert acc == [] and rej


def test_whole_word_case_insensitive():
    assert parsing.has_word("Two Dogs near a bench", "dogs")
    assert not parsing.has_word("hotdogs near a bench", "dogs")
    assert parsing.word_spans("a dog, a Dog and a dogma", "dog") == [(2, 5), (9, 12)]
    assert parsing.has_word("a traffic  light", "traffic light")


def test_too_many_objects():
    acc, rej = parsing.parse_prompt_list("Prompt: a b c\nObjects: a, b, c", max_objects=2)
    assert acc == [] and rej == ["too_many_objects"]


def test_perturbation_checks_each_operation():
    x = "a dog to the left of a bench"
    assert parsing.parse_perturbation("Perturbed: a bench to the left of a dog", x, "swap") == (
        "a bench to the left of a dog", None)
    assert parsing.parse_perturbation("Perturbed: a cat to the left of a bench", x, "swap")[1] == "swap_changed_words"
    assert parsing.parse_perturbation("Perturbed: a cat to the left of a bench", x, "replace")[0] is not None
    assert parsing.parse_perturbation("Perturbed: A dog to the left of a bench.", x, "replace")[1] == "same_as_original"
    assert parsing.parse_perturbation("Perturbed: a dog", x, "drop") == ("a dog", None)
    assert parsing.parse_perturbation("Perturbed: a dog to the left of a red bench", x, "drop")[1] == "drop_not_shorter"
    assert parsing.parse_perturbation("nothing useful", x, "drop")[1] == "no_perturbation_found"
    # replacing with a word already in the prompt still adds one
    assert parsing.check_perturbation("a round clock above a square table",
                                      "a round clock above a round table", "replace") is None


def test_dense_pair():
    x, xp = "a red apple and a green cup", "a red apple and a blue cup"
    text = ("Dense A: a red apple and a green cup on a table\n"
            "Dense B: a red apple and a blue cup on a table\n")
    assert parsing.parse_dense(text, x, xp, ["apple", "cup"]) == (
        ("a red apple and a green cup on a table", "a red apple and a blue cup on a table"), None)
    same = "Dense A: an apple on a table with a cup\nDense B: an apple on a table with a cup"
    assert parsing.parse_dense(same, x, xp, ["apple", "cup"])[1] == "dense_erased_difference"
    lost = "Dense A: a red apple on a table\nDense B: a red apple and a blue cup on a table"
    assert parsing.parse_dense(lost, x, xp, ["apple", "cup"])[1] == "dense_lost_object"
    assert parsing.parse_dense("Dense A: only one line", x, xp, ["apple"])[1] == "no_dense_b"


def test_questions():
    text = "Q: Is there a dog?\nQ: is there a dog?\nQ: Is the dog brown?\nQ: not a question\nrandom"
    assert parsing.parse_questions(text, min_questions=1, max_questions=5) == (
        ["Is there a dog?", "Is the dog brown?"], None)
    assert parsing.parse_questions(text, min_questions=3, max_questions=5)[1] == "too_few_questions"
    assert parsing.parse_questions(text, min_questions=1, max_questions=1)[1] == "too_many_questions"
    assert parsing.parse_questions("garbage", min_questions=1, max_questions=5)[1] == "no_questions_found"


def test_templates_cover_every_sub_category():
    for sub in templates.SUB_CATEGORIES:
        msg = templates.prompt_writing(sub, templates.SEED_EXAMPLES[sub], 3)
        assert templates.DESCRIPTIONS[sub] in msg
        # the seed examples themselves parse and validate
        text = "\n".join(f"Prompt: {p}\nObjects: {', '.join(o)}" for p, o in templates.SEED_EXAMPLES[sub])
        acc, rej = parsing.parse_prompt_list(text)
        assert len(acc) == len(templates.SEED_EXAMPLES[sub]) and not rej
    assert templates.schedule("numeracy", 3) == ["replace", "replace", "drop"]
    assert templates.schedule("color", 5) == ["replace", "swap", "drop", "replace", "swap"]
    for op, (src, dst) in templates.PERTURB_EXAMPLES.items():
        assert parsing.check_perturbation(src, dst, op) is None
