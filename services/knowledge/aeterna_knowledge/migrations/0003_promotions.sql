-- Promotion requests (DOMAIN.md, Knowledge: Promotion to a higher layer): an ACCEPTED item
-- asked to rise to a higher layer, decided by a governance approval at the target unit.
--   state: PENDING_REVIEW 1, APPROVED 2, REJECTED 3, APPLIED 4 (the proto's PromotionState);
--   mode: FULL 1, PARTIAL 2 (PromotionMode); target_layer: the proto's KnowledgeLayer;
--   residual_role: the variant role the source keeps after a PARTIAL apply (VariantRole);
--   source_version: the source's version the request was made for (a newer one aborts
--   apply); content_sha256: the source content the approvers were shown;
--   version: the request's own etag (AIP-154), bumped by every change;
--   promoted_id: the item created by apply.
-- One open request (PENDING_REVIEW or APPROVED) per source: a second is ALREADY_EXISTS.
CREATE TABLE knowledge_promotions (
    tenant_id        text        NOT NULL,
    id               uuid        NOT NULL,
    source_id        uuid        NOT NULL,
    source_version   bigint      NOT NULL,
    content_sha256   text        NOT NULL,
    target_layer     smallint    NOT NULL CHECK (target_layer BETWEEN 2 AND 4),
    target_unit_id   text        NOT NULL CHECK (target_unit_id ~ '^[a-z0-9-]{1,63}$'),
    mode             smallint    NOT NULL CHECK (mode BETWEEN 1 AND 2),
    residual_role    smallint    NOT NULL CHECK (residual_role BETWEEN 1 AND 6),
    state            smallint    NOT NULL DEFAULT 1 CHECK (state BETWEEN 1 AND 4),
    approval_request text        NOT NULL,
    requester        text        NOT NULL,
    promoted_id      uuid,
    version          bigint      NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, source_id) REFERENCES knowledge_items (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, promoted_id) REFERENCES knowledge_items (tenant_id, id)
);
CREATE UNIQUE INDEX knowledge_promotions_open ON knowledge_promotions (tenant_id, source_id)
    WHERE state IN (1, 2);
CREATE INDEX knowledge_promotions_approval ON knowledge_promotions (tenant_id, approval_request);

ALTER TABLE knowledge_promotions ENABLE ROW LEVEL SECURITY;
ALTER TABLE knowledge_promotions FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON knowledge_promotions TO {app_role}
    USING (tenant_id = (SELECT aeterna_tenant()))
    WITH CHECK (tenant_id = (SELECT aeterna_tenant()));
GRANT SELECT, INSERT, UPDATE ON knowledge_promotions TO {app_role};
