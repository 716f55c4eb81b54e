-- Let rollouts go on (spec.paused: false). Edits the live object, like the pause action.
obj.spec.paused = false
return obj
