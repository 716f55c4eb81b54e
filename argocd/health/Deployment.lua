-- Argo CD health of a Perennial Deployment (perennial.ai/v1alpha1): blue-green serving across regions.
-- Argo CD does not read the health of the children (apps/v1 Deployments, Services, HPAs), so this
-- reads the summary the operator writes: Ready (every region serves), Progressing (a rollout or a
-- scale is under way; Unknown RolloutPaused / WaitingForPromotion while it waits for a person),
-- Degraded (aborted or rolled-back rollout, lost region, refused adapter, ...).

local degraded = condition("Degraded")
if degraded ~= nil and degraded.status == "True" then
  return set("Degraded", why(degraded))
end

local progressing = condition("Progressing")
if progressing ~= nil and progressing.status == "Unknown"
    and (progressing.reason == "WaitingForPromotion" or progressing.reason == "RolloutPaused") then
  return set("Suspended", why(progressing))
end
if obj.spec ~= nil and obj.spec.paused == true then
  return set("Suspended", "RolloutPaused: rollouts are paused (spec.paused); nothing is waiting to roll out")
end

local ready = condition("Ready")
if ready == nil then
  return set("Progressing", "Waiting for the Ready condition")
end
if ready.status ~= "True" then
  return set("Progressing", why(ready))
end
if progressing ~= nil and progressing.status ~= "False" then
  return set("Progressing", why(progressing))
end
hs.status = "Healthy"
hs.message = text(ready)
if obj.status.readySummary ~= nil then
  hs.message = hs.message .. " (" .. obj.status.readySummary .. " replicas ready)"
end
return hs
