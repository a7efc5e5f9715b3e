"""What users run beside training: merge, prune (depth and width), evaluate, compare, cache the teacher, serve it."""
