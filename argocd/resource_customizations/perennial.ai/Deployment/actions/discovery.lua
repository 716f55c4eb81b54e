-- Argo CD actions of a Perennial Deployment. Each edits the LIVE object (not Git):
--   promote: sets the annotation perennial.ai/promote to the revision (or Adapter name) a region's
--            rollout waits for (status.regions[].pendingPromotion), as `perennial promote` does;
--   pause / resume: sets spec.paused (Git still owns spec: see argocd/README.md).
local actions = {}
local pending = nil
if obj.status ~= nil and obj.status.regions ~= nil then
  for _, region in ipairs(obj.status.regions) do
    if pending == nil and region.pendingPromotion ~= nil and region.pendingPromotion ~= "" then
      pending = region.pendingPromotion
    end
  end
end
local paused = obj.spec ~= nil and obj.spec.paused == true
actions["promote"] = {["disabled"] = pending == nil}
actions["pause"] = {["disabled"] = paused}
actions["resume"] = {["disabled"] = not paused}
return actions
