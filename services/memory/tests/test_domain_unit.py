"""Unit tests of the pure domain functions (no servers)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from aeterna_common.authz import OrgUnit, Snapshot, UnitKind
from aeterna_common.context import Principal
from aeterna_common.errors import InvalidArgument, PermissionDenied
from aeterna_common.vectors.port import ScoredId
from aeterna_memory.domain.indexing import IndexingPolicy, build_texts
from aeterna_memory.domain.model import (
    Layer,
    Memory,
    MetadataCondition,
    NewMemory,
    Scope,
    SearchQuery,
    new_importance,
)
from aeterna_memory.domain.names import check_parent, parse_memory_name
from aeterna_memory.domain.promotion import (
    TITLE_MAX,
    PromotionRequest,
    approval_key,
    approval_targets,
    approved_copy,
)
from aeterna_memory.domain.service import (
    NEAR_TIE,
    SearchTuning,
    fuse_layers,
    layer_filter,
    request_hash,
)


@pytest.mark.parametrize(
    ("old", "reward", "expected"),
    [(None, 1.0, 0.75), (0.5, -1.0, 0.0), (1.0, 1.0, 1.0), (0.2, 0.4, 0.3), (0.0, -1.0, 0.0)],
)
def test_new_importance(old: float | None, reward: float, expected: float) -> None:
    assert new_importance(old, reward) == pytest.approx(expected)


def test_request_hash_is_canonical() -> None:
    a = NewMemory(Layer.USER, Scope(user_id="u"), "x", metadata={"a": 1, "b": 2})
    b = NewMemory(Layer.USER, Scope(user_id="u"), "x", metadata={"b": 2, "a": 1})
    c = NewMemory(Layer.USER, Scope(user_id="u"), "y", metadata={"a": 1, "b": 2})
    assert request_hash("m", [a]) == request_hash("m", [b])
    assert request_hash("m", [a]) != request_hash("m", [c])
    assert request_hash("m", [a]) != request_hash("other", [a])


def test_index_texts_add_context_and_metadata() -> None:
    m = NewMemory(
        Layer.SESSION,
        Scope(user_id="u", session_id="s"),
        "B: yes, last Saturday!",
        metadata={"session_time": "8 May 2023", "ignored": "zzz", "flag": True},
    )
    policy = IndexingPolicy(
        dense_context=1,
        lexical_context=2,
        metadata_keys=("session_time", "flag"),
        dense_metadata=True,
    )
    texts = build_texts(m, ["A: hi", "A: did you go hiking?"], policy)
    assert texts.dense == "[8 May 2023] B: yes, last Saturday!\nA: did you go hiking?"
    assert texts.lexical_context == ("8 May 2023", "A: hi", "A: did you go hiking?")
    bare = build_texts(
        m, ["A: hi"], IndexingPolicy(dense_context=0, lexical_context=0, metadata_keys=())
    )
    assert bare.dense == "B: yes, last Saturday!" and bare.lexical_context == ()
    default = build_texts(m, ["A: 1", "A: 2", "A: 3"], IndexingPolicy())
    assert default.dense == "B: yes, last Saturday!"
    assert default.lexical_context == ("8 May 2023", "A: 2", "A: 3")


def test_layer_filter_widens_missing_identifiers() -> None:
    q = SearchQuery(
        text="x",
        scope=Scope(user_id="u"),
        layers=[Layer.SESSION],
        tags=["t"],
        metadata=[MetadataCondition("stars", gte=3)],
    )
    f = layer_filter("t1", Layer.SESSION, q)
    keys = [(m.key, m.value, m.any_of, m.gte) for m in f.must]
    assert ("layer", "SESSION", None, None) in keys
    assert ("user_id", "u", None, None) in keys
    assert not any(k == "session_id" for k, *_ in keys)  # no session_id: all sessions
    assert ("tags", None, ["t"], None) in keys
    assert ("metadata.stars", None, None, 3) in keys
    assert f.tenant_id == "t1"


def test_names_check_tenant_before_anything_else() -> None:
    p = Principal("acme", "u")
    assert check_parent(p, "tenants/acme") == "acme"
    with pytest.raises(PermissionDenied):
        check_parent(p, "tenants/other")
    with pytest.raises(PermissionDenied):
        # Another tenant's name is denied even when the id is malformed: no hint leaks.
        parse_memory_name(p, "tenants/other/memories/not-a-uuid")
    with pytest.raises(InvalidArgument):
        parse_memory_name(p, "tenants/acme/memories/not-a-uuid")
    tenant, mid = parse_memory_name(p, "tenants/acme/memories/6F9619FF-8B86-D011-B42D-00CF4FC964FF")
    assert (tenant, mid) == ("acme", "6f9619ff-8b86-d011-b42d-00cf4fc964ff")


def test_fused_ranking_normalises_across_layers_and_breaks_only_near_ties() -> None:
    tuning = SearchTuning(fusion_method="minmax", dense_weight=0.5, lexical_weight=0.5)
    user = ([ScoredId("u1", 0.30), ScoredId("u2", 0.20)], [ScoredId("u1", 2.0)])
    company = ([ScoredId("c1", 0.90)], [ScoredId("c1", 12.0)])
    ranked = fuse_layers([(Layer.USER, user), (Layer.COMPANY, company)], tuning)
    assert [c.id for c in ranked] == ["c1", "u1", "u2"]
    assert ranked[0].score == pytest.approx(1.0)
    assert ranked[1].score < 0.3  # the user layer's best is not normalised to 1.0
    assert ranked[0].dense_score == pytest.approx(0.9) and ranked[0].lexical_score == 12.0

    # A near-tie (gap below NEAR_TIE) goes to the more specific layer ...
    gap = NEAR_TIE / 4
    near = fuse_layers(
        [
            (Layer.USER, ([ScoredId("u", 0.5)], [])),
            (Layer.COMPANY, ([ScoredId("c", 0.5 + gap)], [])),
            (Layer.TEAM, ([ScoredId("floor", 0.0)], [])),
        ],
        SearchTuning(fusion_method="minmax", dense_weight=1.0, lexical_weight=0.0),
    )
    assert [c.id for c in near] == ["u", "c", "floor"]
    # ... a clear gap does not.
    clear = fuse_layers(
        [
            (Layer.USER, ([ScoredId("u", 0.5)], [])),
            (Layer.COMPANY, ([ScoredId("c", 0.6)], [])),
            (Layer.TEAM, ([ScoredId("floor", 0.0)], [])),
        ],
        SearchTuning(fusion_method="minmax", dense_weight=1.0, lexical_weight=0.0),
    )
    assert [c.id for c in clear] == ["c", "u", "floor"]


def _kept(mid: str, layer: Layer, text: str, vector: list[float]) -> Any:
    from datetime import UTC, datetime

    import numpy as np
    from aeterna_memory.domain.model import Memory
    from aeterna_memory.domain.service import Candidate, _Kept

    now = datetime.now(UTC)
    memory = Memory(
        tenant_id="t",
        id=mid,
        layer=layer,
        scope=Scope(user_id="u"),
        content=text,
        content_hash=f"h-{text}",
        metadata={},
        tags=[],
        importance=0.5,
        access_count=0,
        last_accessed_at=None,
        created_at=now,
        updated_at=now,
        expire_at=None,
        deleted_at=None,
        revision=1,
        embedding_model="m/2",
        embedding_dimension=2,
    )
    v = np.asarray(vector, dtype=np.float32)
    return _Kept(Candidate(mid, layer, 0.5, 0.0, 0.0, 0), memory, v / np.linalg.norm(v))


def test_near_duplicates_collapse_to_the_more_specific_layer_only_across_layers() -> None:
    from aeterna_memory.domain.service import _keep

    kept: list[Any] = []
    # A less specific copy ranked first is replaced by the more specific near-duplicate.
    _keep(kept, _kept("company", Layer.COMPANY, "moved to Tuesday.", [1.0, 0.01]))
    _keep(kept, _kept("user", Layer.USER, "moved to Tuesday", [1.0, 0.0]))
    assert [k.candidate.id for k in kept] == ["user"]
    # A near-duplicate of the same layer is a different fact: both stay.
    _keep(kept, _kept("user-2", Layer.USER, "moved to Thursday", [1.0, 0.02]))
    assert [k.candidate.id for k in kept] == ["user", "user-2"]
    # A less specific near-duplicate after the specific one is dropped.
    _keep(kept, _kept("team", Layer.TEAM, "moved to Thursday!", [1.0, 0.03]))
    assert [k.candidate.id for k in kept] == ["user", "user-2"]
    # Identical content collapses in any layer.
    _keep(kept, _kept("user-3", Layer.USER, "moved to Tuesday", [0.0, 1.0]))
    assert [k.candidate.id for k in kept] == ["user", "user-2"]


def _project_memory(**overrides: Any) -> Memory:
    now = datetime.now(UTC)
    fields: dict[str, Any] = {
        "tenant_id": "t",
        "id": "0b9f3c1e-2a43-4c55-9d6f-3f1d7f0a9e11",
        "layer": Layer.PROJECT,
        "scope": Scope(project_id="checkout"),
        "content": "mail ops@example.com or call +44 20 7946 0958",
        "content_hash": "",
        "metadata": {"owner": "dana@example.com", "project_id": "checkout"},
        "tags": ["ops"],
        "importance": 0.9,
        "access_count": 10,
        "last_accessed_at": now,
        "created_at": now,
        "updated_at": now,
        "expire_at": None,
        "deleted_at": None,
        "revision": 3,
        "embedding_model": "m/384",
        "embedding_dimension": 384,
    }
    return Memory(**{**fields, **overrides})


def test_approval_targets_are_the_parents_and_a_user_memorys_team() -> None:
    snapshot = Snapshot(
        "t",
        units=(
            OrgUnit("acme", UnitKind.COMPANY),
            OrgUnit("eng", UnitKind.ORGANIZATION, "acme"),
            OrgUnit("payments", UnitKind.TEAM, "eng"),
            OrgUnit("checkout", UnitKind.PROJECT, "payments"),
            OrgUnit("billing", UnitKind.PROJECT, "payments"),
            OrgUnit("stray", UnitKind.PROJECT, "gone"),  # its parent is not in the tree
            OrgUnit("skunk", UnitKind.TEAM, "acme"),  # a team right under the company
        ),
    )
    assert approval_targets(snapshot) == {
        Layer.USER: {"payments": "payments", "skunk": "skunk"},
        Layer.PROJECT: {"checkout": "payments", "billing": "payments"},
        Layer.TEAM: {"payments": "eng"},
        Layer.ORG: {"eng": "acme"},
    }
    assert approval_targets(Snapshot("t")) == {
        Layer.USER: {},
        Layer.PROJECT: {},
        Layer.TEAM: {},
        Layer.ORG: {},
    }
    # The key a memory's target is looked up by.
    user = _project_memory(layer=Layer.USER, scope=Scope(user_id="dana"), metadata={})
    assert approval_key(user) is None
    assert approval_key(replace(user, metadata={"team_id": "payments"})) == "payments"
    assert approval_key(replace(user, metadata={"team_id": 7})) is None
    assert approval_key(_project_memory()) == "checkout"
    team = _project_memory(layer=Layer.TEAM, scope=Scope(team_id="payments"))
    assert approval_key(team) == "payments"
    org = _project_memory(layer=Layer.ORG, scope=Scope(org_id="eng"))
    assert approval_key(org) == "eng"
    company = _project_memory(layer=Layer.COMPANY, scope=Scope(company_id="acme"))
    assert approval_key(company) is None


def test_approved_copies_are_scoped_to_the_target_unit() -> None:
    team = _project_memory(layer=Layer.TEAM, scope=Scope(team_id="payments"))
    org = approved_copy(team, 0.9, "eng")
    assert org is not None and (org.layer, org.scope) == (Layer.ORG, Scope(org_id="eng"))
    company = approved_copy(replace(team, layer=Layer.ORG, scope=Scope(org_id="eng")), 0.9, "acme")
    assert company is not None
    assert (company.layer, company.scope) == (Layer.COMPANY, Scope(company_id="acme"))
    user = approved_copy(replace(team, layer=Layer.USER, scope=Scope(user_id="dana")), 0.9, "x")
    assert user is not None and (user.layer, user.scope) == (Layer.TEAM, Scope(team_id="x"))
    assert approved_copy(replace(team, layer=Layer.COMPANY), 0.9, "acme") is None


def test_team_copy_is_redacted_and_records_its_approval() -> None:
    memory = _project_memory()
    copy = approved_copy(memory, 0.93, "payments", approval_request="tenants/t/approvalRequests/r")
    assert copy is not None
    assert (copy.layer, copy.scope) == (Layer.TEAM, Scope(team_id="payments"))
    assert copy.content == "mail [email redacted] or call [phone redacted]"
    assert copy.metadata == {
        "owner": "[email redacted]",
        "project_id": "checkout",
        "original_memory": f"tenants/t/memories/{memory.id}",
        "original_revision": 3,
        "promotion_score": 0.93,
        "approval_request": "tenants/t/approvalRequests/r",
    }
    # While asking there is no request yet; the content asked for is the same.
    asking = approved_copy(memory, 0.93, "payments")
    assert asking is not None and "approval_request" not in asking.metadata
    assert asking.content == copy.content
    # Never a sensitive or private memory, never another layer.
    assert approved_copy(_project_memory(metadata={"private": "yes"}), 0.93, "payments") is None
    assert approved_copy(_project_memory(layer=Layer.SESSION), 0.93, "payments") is None


def test_promotion_request_names_the_revision_and_fits_governance() -> None:
    request = PromotionRequest(
        tenant_id="t",
        memory_id="m1",
        revision=3,
        source_layer=Layer.PROJECT,
        source_id="p" * 255,
        target_layer=Layer.TEAM,
        target_unit="payments",
        score=0.93,
        content_sha256="ab" * 32,
    )
    assert request.request_id == "promote-m1-3"
    assert len(request.title) == TITLE_MAX
    org = replace(request, source_layer=Layer.TEAM, source_id="payments", target_layer=Layer.ORG)
    assert replace(org, target_unit="eng").title == (
        "Promote a memory of team payments to organization eng"
    )
    assert replace(org, target_unit="eng").payload()["target_layer"] == "ORG"
    assert request.payload() == {
        "memory": "tenants/t/memories/m1",
        "revision": 3,
        "target_layer": "TEAM",
        "content_sha256": "ab" * 32,
    }
