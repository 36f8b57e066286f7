"""Jinja templates of the model cards (packaged as ``uti_peft.model_cards``)."""
