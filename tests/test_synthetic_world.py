"""The synthetic world: deterministic, the configured sizes, held-out splits really held out."""

from __future__ import annotations

from selfdestruct.data.synthetic import (BENIGN_FAMILIES, FINITE_FAMILIES, HARM_CATEGORIES, SyntheticWorld,
                                         WorldConfig, task_answer_correct)


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = (SyntheticWorld(WorldConfig(seed=s)) for s in (0, 0, 1))
    assert a.split("attack_pool") == b.split("attack_pool")
    assert a.split("attack_pool") != c.split("attack_pool")


def test_split_sizes_are_the_configured_sizes():
    cfg = WorldConfig()
    world = SyntheticWorld(cfg)
    assert len(world.split("attack_pool")) == cfg.attack_pool >= 2000
    assert len(world.split("align_harmful")) == cfg.align_harmful
    assert len(world.split("align_benign")) == cfg.align_benign
    assert len(world.split("eval_harmful")) == cfg.eval_harmful
    per_family = {fam: sum(ex.category == fam for ex in world.split("eval_benign")) for fam in BENIGN_FAMILIES}
    # A finite family has fewer distinct prompts than the configured count: each is asked once.
    assert per_family.pop("capital") == min(cfg.eval_benign_per_family, cfg.num_countries)
    assert per_family.pop("add") == min(cfg.eval_benign_per_family, (cfg.max_operand + 1) * len(cfg.addends))
    assert set(per_family.values()) == {cfg.eval_benign_per_family}
    assert len(world.split("finetune_pool")) == cfg.finetune_pool


def test_at_least_five_benign_families_and_six_harm_categories():
    world = SyntheticWorld(WorldConfig())
    assert {ex.category for ex in world.split("eval_benign")} == set(BENIGN_FAMILIES)
    assert len(BENIGN_FAMILIES) >= 5
    assert {ex.category for ex in world.split("attack_pool")} == set(HARM_CATEGORIES)
    assert len(HARM_CATEGORIES) >= 6


def test_evaluation_prompts_never_appear_in_training_splits():
    world = SyntheticWorld(WorldConfig())
    held_out = {ex.prompt for ex in world.split("eval_harmful")}
    held_out |= {ex.prompt for ex in world.split("eval_benign") if ex.category not in FINITE_FAMILIES}
    held_out |= {ex.prompt for ex in world.split("eval_finetune")}
    for name in ("attack_pool", "defense_harmful", "align_harmful", "align_benign", "finetune_pool",
                 "pretrain_tasks", "pretrain_harmful"):
        assert not held_out & {ex.prompt for ex in world.split(name)}, name
    attack = {ex.prompt for ex in world.split("attack_pool")}
    assert not attack & {ex.prompt for ex in world.split("align_harmful")}


def test_disjoint_switch_separates_defense_and_attack_categories():
    cfg = WorldConfig(disjoint_categories=True)
    world = SyntheticWorld(cfg)
    defense = {ex.category for ex in world.split("defense_harmful")}
    attack = {ex.category for ex in world.split("attack_pool")} | {ex.category for ex in world.split("eval_harmful")}
    assert defense == set(cfg.defense_categories)
    assert attack == set(cfg.attack_categories)
    assert not defense & attack


def test_task_answers_are_exact():
    world = SyntheticWorld(WorldConfig())
    for ex in world.split("eval_benign") + world.split("finetune_pool")[:50]:
        assert task_answer_correct(ex.answer, ex.answer)
    by_family = {ex.category: ex for ex in world.split("eval_benign")}
    a, b = (int(t) for t in by_family["add"].prompt.removeprefix("What is ").removesuffix("?").split(" plus "))
    assert by_family["add"].answer == str(a + b)
    items = by_family["sort"].prompt.split(": ")[1].split()
    assert by_family["sort"].answer.split() == sorted(items)
    items = by_family["reverse"].prompt.split(": ")[1].split()
    assert by_family["reverse"].answer.split() == items[::-1]
    shift = world.split("finetune_pool")[0]
    src = shift.prompt.split(": ")[1].split()
    expected = [chr((ord(c) - ord("a") + 1) % 26 + ord("a")) for c in src]
    assert shift.answer.split() == expected


def test_harmful_responses_are_fictional_step_lists_with_refusals():
    world = SyntheticWorld(WorldConfig())
    for ex in world.split("attack_pool")[:200]:
        assert ex.response.startswith("Sure. Step 1:")
        assert ex.refusal and ex.refusal.split(".")[0] + "." in ("I cannot help with that.",
                                                                 "I will not help with that.", "Sorry, I cannot do that.")


def test_validation_tasks_are_held_out_from_evaluation_and_unseen_in_training_where_the_family_allows():
    cfg = WorldConfig()
    world = SyntheticWorld(cfg)
    validation = world.split("val_benign")
    held_out = {ex.prompt for ex in world.split("eval_benign") if ex.category not in FINITE_FAMILIES}
    assert not held_out & {ex.prompt for ex in validation}
    training = {ex.prompt for name in ("align_benign", "pretrain_tasks", "finetune_pool") for ex in world.split(name)}
    per_family = {fam: [ex for ex in validation if ex.category == fam] for fam in BENIGN_FAMILIES}
    eval_sizes = {fam: sum(ex.category == fam for ex in world.split("eval_benign")) for fam in BENIGN_FAMILIES}
    assert {fam: len(exs) for fam, exs in per_family.items()} == eval_sizes  # the held-out set's shape
    for fam in ("reverse", "sort", "sentiment"):  # families with prompts to spare: none seen in training
        assert not training & {ex.prompt for ex in per_family[fam]}, fam
    # topic has 192 prompts: the held-out set took 60, training holds the rest, so its validation tasks are seen
    assert {ex.prompt for ex in per_family["topic"]} <= training
    # interleaved: the first 6 are one of each family, so a prefix keeps every family
    assert [ex.category for ex in validation[:len(BENIGN_FAMILIES)]] == list(BENIGN_FAMILIES)
    # drawn last: every other split is as it is without it
    assert world.split("align_benign") == SyntheticWorld(cfg).split("align_benign")
