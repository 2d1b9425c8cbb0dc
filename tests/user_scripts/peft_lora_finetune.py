"""A typical user's LoRA fine-tuning script for Qwen2-VL with PEFT, written against transformers.

tests/test_lora.py runs it unchanged except for the import line (transformers → qwen2vl).
Usage: python peft_lora_finetune.py MODEL_DIR OUTPUT_DIR
"""
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

model_id, output_dir = sys.argv[1], sys.argv[2]
torch.manual_seed(0)

model = Qwen2VLForConditionalGeneration.from_pretrained(model_id, torch_dtype=torch.float32)
processor = AutoProcessor.from_pretrained(model_id)

model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.enable_input_require_grads()
lora_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
model = get_peft_model(model, lora_config)
model.print_trainable_parameters()

image = Image.new("RGB", (112, 112), "red")
messages = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the image?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
]
text = processor.apply_chat_template(messages, tokenize=False)
batch = processor(text=[text], images=[image], return_tensors="pt", padding=True)
labels = batch["input_ids"].clone()
labels[labels == processor.tokenizer.pad_token_id] = -100

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
model.train()
for step in range(4):
    outputs = model(**batch, labels=labels)
    outputs.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step} loss {outputs.loss.item():.4f}")

model.save_pretrained(output_dir)
processor.save_pretrained(output_dir)

# Inference with the saved adapter
base = Qwen2VLForConditionalGeneration.from_pretrained(model_id, torch_dtype=torch.float32)
model = PeftModel.from_pretrained(base, output_dir)
model = model.merge_and_unload()
model.eval()
prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
inputs = processor(text=[prompt], images=[image], return_tensors="pt")
with torch.no_grad():
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
trimmed = generated[:, inputs["input_ids"].shape[1]:]
print("answer:", processor.batch_decode(trimmed, skip_special_tokens=True)[0])
