"""Real-time delivery: envelope, broadcaster, emitters."""
