"""Lightning callbacks: the GAIN-RL scheduler."""
