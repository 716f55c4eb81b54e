-- Stop every rollout where it stands (spec.paused: true); safety still acts (see the CRD's
-- description of spec.paused). Edits the live object: with Git as the source of truth, commit
-- `paused: true` instead, or leave `paused` out of Git so a sync does not undo it.
obj.spec.paused = true
return obj
