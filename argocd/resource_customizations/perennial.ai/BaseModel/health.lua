-- Argo CD health of a Perennial BaseModel (perennial.ai/v1alpha1).
-- Runs in Argo CD's Lua sandbox without its open libraries: no string.*, no string methods.
-- The operator writes status.observedGeneration and a Ready condition (reasons: SourceAvailable,
-- Cached; Downloading while the download Job runs; SecretNotFound, SecretKeyMissing, ClaimNotFound,
-- DownloadFailed, InvalidSpec when it cannot work).
local hs = {}
local function condition(ctype)
  if obj.status ~= nil and obj.status.conditions ~= nil then
    for _, c in ipairs(obj.status.conditions) do
      if c.type == ctype then
        return c
      end
    end
  end
  return nil
end
local function text(c)
  if c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return c.reason or ""
end

if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report a status"
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end
local ready = condition("Ready")
if ready == nil or ready.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = text(ready)
  return hs
end
if ready.reason == "Downloading" then
  hs.status = "Progressing"
else
  hs.status = "Degraded"
end
hs.message = ready.reason .. ": " .. text(ready)
return hs
