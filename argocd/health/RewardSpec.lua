-- Argo CD health of a Perennial RewardSpec (perennial.ai/v1alpha1).
-- The operator writes a Ready condition (static validation of the graders: Valid; InvalidSpec,
-- InvalidGrader, SecretNotAllowed) and a Validated condition (the rubric's self-tests in a Job:
-- TestsPassed, NoTests; Unknown ValidationRunning; False TestsFailed, ValidationJobFailed).
local ready = condition("Ready")
if ready == nil or ready.status == "Unknown" then
  return set("Progressing", "Waiting for the Ready condition")
end
if ready.status == "False" then
  return set("Degraded", why(ready))
end
local validated = condition("Validated")
if validated == nil or validated.status == "Unknown" then
  hs.status = "Progressing"
  if validated ~= nil then
    hs.message = text(validated)
  else
    hs.message = "Waiting for the rubric's tests to run"
  end
  return hs
end
if validated.status == "False" then
  return set("Degraded", why(validated))
end
return set("Healthy", text(validated))
