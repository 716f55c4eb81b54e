-- Promote the rollout waiting for a person: the operator promotes a region whose
-- status.regions[].pendingPromotion equals the perennial.ai/promote annotation (a value left from
-- an earlier promotion never promotes another revision). Does nothing when nothing waits.
local pending = nil
if obj.status ~= nil and obj.status.regions ~= nil then
  for _, region in ipairs(obj.status.regions) do
    if pending == nil and region.pendingPromotion ~= nil and region.pendingPromotion ~= "" then
      pending = region.pendingPromotion
    end
  end
end
if pending ~= nil then
  if obj.metadata.annotations == nil then
    obj.metadata.annotations = {}
  end
  obj.metadata.annotations["perennial.ai/promote"] = pending
end
return obj
