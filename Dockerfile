# ovis-server on a CUDA base that already carries PyTorch.
# Build: docker build -t ovis-server .
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir ".[postgresql,s3]"

# Weights download into the Hugging Face cache; mount a volume there to keep them.
ENV HF_HOME=/cache/huggingface
EXPOSE 8000
ENTRYPOINT ["ovis-server"]
CMD ["serve", "--host", "0.0.0.0"]
