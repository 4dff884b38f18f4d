-- Every approved promotion edge (DOMAIN.md, Memory: Promotion: USER→TEAM, PROJECT→TEAM,
-- TEAM→ORG, ORG→COMPANY) shares memory_promotions: a record names the copy's layer and the
-- unit whose approvers decide (its id is the copy's scope identifier of that layer).
-- Records made before are PROJECT→TEAM ones: their team is their target unit.
ALTER TABLE memory_promotions RENAME COLUMN team_id TO target_unit;
ALTER TABLE memory_promotions ADD COLUMN target_layer text NOT NULL DEFAULT 'TEAM'
    CHECK (target_layer IN ('TEAM', 'ORG', 'COMPANY'));
ALTER TABLE memory_promotions ALTER COLUMN target_layer DROP DEFAULT;
