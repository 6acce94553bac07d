"""Drop-in replacements for the loss/logprob functions of TRL, verl and OpenRLHF."""
