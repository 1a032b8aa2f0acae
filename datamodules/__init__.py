"""Lightning DataModules: rows -> prompts -> ranked dataset -> sampler."""
