"""Background training: schedule, cycle (RM → PPO → gate → publish), supervision."""
