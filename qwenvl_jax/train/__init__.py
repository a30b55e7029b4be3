"""Fine-tuning: objectives (SFT, DPO), their data, the train step and loop."""
