"""How a sequence continues: its generation settings (`GenerationParams`, declared once), the
sampler that picks each next token, and the stop conditions that end it."""
