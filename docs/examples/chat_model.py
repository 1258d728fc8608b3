"""Make the walkthrough's chat model (docs/finetune.md) from the demo's exported model: a Hugging Face
folder laid out as transformers 5 saves a chat model such as Gemma 2: turn markers as special tokens,
the template in chat_template.jinja, and a generation_config.json whose eos_token_id lists two ids
(the EOS and <end_of_turn>), so that a reply stops at the end of its turn.

  python docs/examples/chat_model.py models/stdlib_tiny_hf models/stdlib_chat
"""

import argparse

import transformers

TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", help="a Hugging Face folder (launch.convert --hf-out)")
    p.add_argument("out")
    args = p.parse_args()
    # Special-token strings in the text become their ids (the template writes them as text).
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.base, split_special_tokens=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    model.resize_token_embeddings(len(tokenizer))
    tokenizer.chat_template = TEMPLATE
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)  # transformers 5 writes the template to chat_template.jinja
    print(f"wrote {args.out}: vocabulary {len(tokenizer)}, eos ids {model.generation_config.eos_token_id}")


if __name__ == "__main__":
    main()
