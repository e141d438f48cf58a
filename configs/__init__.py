"""The shipped training configs, installed as `llada_jax.configs` (`--config tiny`, `--config
llada_8b:v5e_64`); `llada_jax/configs` is a link to this folder, so there is one copy."""
