"""The ExCB method: backbones, heads, balancing and its baselines, loss, views, schedules, k-means, and the
learner that runs one training step."""
