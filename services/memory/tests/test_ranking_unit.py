"""Second-stage ranking features on small hand-written episodes, and the ranker file check.

No servers: these exercise :mod:`aeterna_common.search.temporal` and
:mod:`aeterna_memory.domain.ranking` directly."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aeterna_common.search import temporal
from aeterna_common.search.temporal import DateSpan
from aeterna_common.server import StartupError
from aeterna_memory.app import build_ranker
from aeterna_memory.domain import ranking as rk
from aeterna_memory.domain.model import Layer, NewMemory, Scope
from aeterna_memory.settings import MemorySettings

MONDAY = date(2023, 5, 8)  # 8 May 2023 was a Monday


def col(x: np.ndarray, name: str) -> list[float]:
    return [float(v) for v in x[:, rk.FEATURES.index(name)]]


def item(
    mid: str,
    fused: float,
    content: str,
    *,
    speaker: str = "Ann",
    user: str = "u1",
    session: str | None = "s1",
    position: int = 0,
    **metadata: Any,
) -> rk.RankInput:
    return rk.RankInput(
        id=mid,
        fused=fused,
        dense=fused,
        lexical=fused,
        dense_rank=1,
        lexical_rank=1,
        content=content,
        metadata={"speaker": speaker, **metadata},
        episode=("SESSION", user, session) if session else None,
        order=(position,),
        layer=3,
        importance=0.5,
        age_days=0.0,
    )


# ---------------------------------------------------------------------------------- time


def test_relative_dates_resolve_against_the_session_day() -> None:
    def days(text: str) -> list[str]:
        return [s.iso() for s in temporal.resolve_relative(text, MONDAY)]

    assert days("I went there yesterday") == ["2023-05-07"]
    assert days("we met last Saturday") == ["2023-05-06"]
    # "last Monday" said on a Monday is a week before, never the same day.
    assert days("since last Monday") == ["2023-05-01"]
    assert days("it was two weeks ago") == ["2023-04-24/2023-04-30"]
    assert days("last month") == ["2023-04-01/2023-04-30"]
    assert days("back in the day, last year") == ["2022-01-01/2022-12-31"]
    assert days("next Friday") == ["2023-05-19"]
    assert days("nothing temporal here") == []


def test_session_times_and_explicit_dates() -> None:
    assert temporal.anchor_date("1:56 pm on 8 May, 2023") == MONDAY
    assert temporal.anchor_date("2023-05-08T13:56:00") == MONDAY
    assert temporal.anchor_date("sometime") is None
    assert temporal.explicit_dates("What did she do in May 2023?") == (DateSpan.month(2023, 5),)
    assert temporal.explicit_dates("on May 8th, 2023 and in 2021") == (
        DateSpan.day(MONDAY),
        DateSpan.year(2021),
    )
    assert temporal.is_temporal_query("When did Ann go hiking?")
    assert temporal.is_temporal_query("How long ago was her birthday?")
    assert not temporal.is_temporal_query("What does Ann like to paint?")
    assert temporal.has_time_expression("see you next Friday")
    assert not temporal.has_time_expression("I like painting sunsets")


def test_event_dates_are_added_at_write_time_and_never_override_the_writer() -> None:
    said = NewMemory(
        layer=Layer.SESSION,
        scope=Scope(user_id="u1", session_id="s1"),
        content="Ann: I ran a charity race yesterday!",
        metadata={"session_time": "1:56 pm on 8 May, 2023"},
    )
    assert rk.with_event_dates(said).metadata[rk.EVENT_DATE_KEY] == ["2023-05-07"]
    own = NewMemory(
        layer=said.layer,
        scope=said.scope,
        content=said.content,
        metadata={**said.metadata, rk.EVENT_DATE_KEY: "kept"},
    )
    assert rk.with_event_dates(own) is own
    no_anchor = NewMemory(layer=said.layer, scope=said.scope, content=said.content)
    assert rk.with_event_dates(no_anchor) is no_anchor


def test_a_question_naming_a_date_matches_the_turn_that_said_yesterday() -> None:
    race = item(
        "race",
        0.5,
        "Ann: I ran a charity race yesterday!",
        session_time="1:56 pm on 8 May, 2023",
        event_date=["2023-05-07"],
    )
    other = item(
        "other", 0.6, "Ann: I love running.", session_time="1:56 pm on 20 June, 2023", position=1
    )
    x = rk.features(rk.QueryInfo.of("What did Ann do on 7 May 2023?"), [race, other])
    assert col(x, "date_match") == [1.0, 0.0]
    assert col(x, "has_time") == [1.0, 0.0]
    x = rk.features(rk.QueryInfo.of("When did Ann run a race?"), [race, other])
    assert col(x, "temporal_query") == [1.0, 1.0]
    assert col(x, "date_match") == [0.0, 0.0]


# --------------------------------------------------------------------------- participants


def test_a_query_naming_one_participant_boosts_only_that_participants_memories() -> None:
    items = [
        item("a", 0.5, "Ann: I paint.", speaker="Ann"),
        item("b", 0.5, "Bo: I swim.", speaker="Bo", position=1),
        item("c", 0.5, "a note", speaker="", position=2),
    ]
    x = rk.features(rk.QueryInfo.of("What does Ann's brother do?"), items)
    assert col(x, "participant_named") == [1.0, 1.0, 1.0]
    assert col(x, "participant_match") == [1.0, 0.0, 0.0]
    # Two participants named: no one is favoured.
    x = rk.features(rk.QueryInfo.of("Did Ann and Bo meet?"), items)
    assert col(x, "participant_match") == [0.0, 0.0, 0.0]
    assert col(x, "participant_named") == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------- episodes, neighbours


def test_neighbours_share_within_a_session_never_across_sessions_or_users() -> None:
    items = [
        item("fact", 0.2, "Ann: I adopted a puppy.", position=0),
        item("reply", 0.9, "Bo: what a lovely dog!", position=1),
        item("later", 0.1, "Ann: bye", position=2),
        # Same positions, another session and another user: no share from "reply".
        item("s2", 0.2, "Ann: hello", session="s2", position=0),
        item("u2", 0.2, "Cy: hello", user="u2", position=0),
        item("none", 0.3, "a loose note", session=None),
    ]
    x = rk.features(rk.QueryInfo.of("what pet did Ann get?"), items)
    neighbour = dict(zip([i.id for i in items], col(x, "neighbour"), strict=True))
    assert neighbour["fact"] == pytest.approx(0.9)  # the next memory's score
    assert neighbour["reply"] == pytest.approx(0.1)
    assert neighbour["later"] == 0.0
    assert neighbour["s2"] == neighbour["u2"] == neighbour["none"] == 0.0
    episode = dict(zip([i.id for i in items], col(x, "episode_best"), strict=True))
    assert episode["fact"] == episode["later"] == pytest.approx(0.9)
    assert episode["s2"] == episode["u2"] == pytest.approx(0.2)
    assert episode["none"] == 0.0
    # The hand-tuned ranker lifts the fact above an unrelated, higher-scored memory.
    ranked = rk.rerank(rk.HandTunedRanker(), rk.QueryInfo.of("what pet"), items)
    assert [items[k].id for k in ranked].index("fact") < [items[k].id for k in ranked].index("none")


# ---------------------------------------------------------------------------- ranker file


def shipped() -> dict[str, Any]:
    doc = rk.LambdaMartRanker.load().document
    return dict(doc)


def test_the_shipped_ranker_loads_with_the_codes_feature_list() -> None:
    ranker = rk.LambdaMartRanker.load()
    assert ranker.document["features"] == list(rk.FEATURES)
    assert ranker.document["version"] == rk.RANKER_VERSION
    items = [item(str(i), 1 - i / 10, f"Ann: turn {i}", position=i) for i in range(8)]
    scores = ranker.scores(rk.QueryInfo.of("When did Ann paint?"), items)
    assert scores.shape == (8,) and np.isfinite(scores).all()


def test_the_numpy_tree_walk_gives_lightgbms_scores() -> None:
    ranker = rk.LambdaMartRanker.load()
    rng = np.random.default_rng(7)
    x = rng.random((64, len(rk.FEATURES)))
    x[:, rk.FEATURES.index("temporal_query")] = rng.integers(0, 2, 64)
    x[:8, rk.FEATURES.index("dense_rank_rr")] = 0.0  # exact zeros, as for absent ranks
    expected = ranker.booster.predict(x, num_threads=1)
    assert ranker.trees._masks is not None  # 15 leaves a tree: the bit-vector evaluation
    assert np.allclose(ranker.trees.predict(x), expected, rtol=0, atol=1e-12)
    walked = ranker.trees._predict_walk(x.ravel(), *x.shape)
    assert np.allclose(walked, expected, rtol=0, atol=1e-12)
    x[3, 0] = np.nan  # a missing value takes LightGBM's side too
    assert np.allclose(
        ranker.trees.predict(x), ranker.booster.predict(x, num_threads=1), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("leaves", [2, 16, 17, 40, 100])
def test_both_tree_evaluations_give_lightgbms_scores_whatever_the_tree_size(leaves: int) -> None:
    import lightgbm

    rng = np.random.default_rng(leaves)
    x = rng.random((400, 5))
    x[:, 2] = rng.integers(0, 3, 400)  # ties at split thresholds
    y = (x[:, 0] + x[:, 1] * x[:, 2] + rng.normal(0, 0.1, 400) > 1.2).astype(float)
    booster = lightgbm.train(
        {
            "objective": "regression",
            "num_leaves": leaves,
            "min_data_in_leaf": 2,
            "verbose": -1,
            "num_threads": 1,
            "deterministic": True,
        },
        lightgbm.Dataset(x, y),
        num_boost_round=20,
    )
    trees = rk.TreeEnsemble(booster.dump_model())
    # Up to 64 leaves a tree the bit vectors fit one integer; beyond, the walk scores alone.
    most = max(t["num_leaves"] for t in booster.dump_model()["tree_info"])
    assert (trees._masks is not None) == (most <= 64)
    probe = rng.random((33, 5))
    probe[:, 2] = rng.integers(0, 3, 33)
    expected = booster.predict(probe, num_threads=1)
    assert np.allclose(trees.predict(probe), expected, rtol=0, atol=1e-12)
    assert np.allclose(trees._predict_walk(probe.ravel(), *probe.shape), expected, atol=1e-12)
    assert trees.predict(probe[:0]).shape == (0,)


def test_same_file_same_scores_in_another_instance() -> None:
    items = [
        item(str(i), 1 - i / 10, f"Ann: I went out {'yesterday' if i % 2 else 'today'}", position=i)
        for i in range(12)
    ]
    q = rk.QueryInfo.of("When did Ann go out?")
    a = rk.LambdaMartRanker.load().scores(q, items)
    b = rk.LambdaMartRanker(shipped()).scores(q, items)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"features": [*rk.FEATURES[:-1]]}, "trained on features"),
        ({"features": list(reversed(rk.FEATURES))}, "trained on features"),
        ({"version": rk.RANKER_VERSION + 1}, "version"),
        ({"model": "not a model"}, "no loadable model"),
    ],
)
def test_a_mismatched_ranker_file_stops_the_service(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    path = tmp_path / "ranker.json"
    path.write_text(json.dumps({**shipped(), **change}))
    with pytest.raises(rk.RankerFileError, match=message):
        rk.LambdaMartRanker.load(path)
    settings = MemorySettings(ranker_file=path)
    with pytest.raises(StartupError, match=f"{message}.*make train-ranker"):
        build_ranker(settings)


def test_a_missing_ranker_file_stops_the_service_and_the_fallback_needs_none(
    tmp_path: Path,
) -> None:
    with pytest.raises(StartupError, match="cannot read the ranker file"):
        build_ranker(MemorySettings(ranker_file=tmp_path / "absent.json"))
    assert isinstance(
        build_ranker(MemorySettings(ranker="hand-tuned", ranker_file=tmp_path / "absent.json")),
        rk.HandTunedRanker,
    )
    assert build_ranker(MemorySettings(ranker="none")) is None
