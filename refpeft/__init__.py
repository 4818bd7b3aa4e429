"""refpeft: the exact, framework-free reference for parameter-efficient fine-tuning."""
