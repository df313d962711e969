"""Deploying a trained model outside sftlab: GGUF files for llama.cpp / Ollama / LM Studio, with the chat template
sftlab trained with (`gguf`), its rendering as Jinja (`chat_template`) and an Ollama Modelfile (`modelfile`)."""
