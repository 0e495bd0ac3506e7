# CPU image: the server only (no TensorFlow), as a non-root user.
#   docker build -t hmlstm:cpu .
#   docker run -p 50051:50051 -p 9464:9464 hmlstm:cpu
FROM python:3.11-slim

RUN groupadd --gid 10001 hmlstm && useradd --create-home --uid 10001 --gid 10001 hmlstm
WORKDIR /app
COPY pyproject.toml README.md ./
COPY scripts/cpu_requirements.py ./scripts/
COPY hmlstm ./hmlstm
# The core install pulls onnxruntime-gpu on Linux x86_64; the CPU image takes the CPU wheel instead: the
# dependencies of pyproject.toml with onnxruntime for onnxruntime-gpu, then the package without them.
RUN python scripts/cpu_requirements.py /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && pip install --no-cache-dir --no-deps . \
 && rm /tmp/requirements.txt

# /data: where --state-store sqlite:/data/state.db lives (a volume owned by the service user).
RUN mkdir -p /data && chown hmlstm /data
USER 10001:10001
EXPOSE 50051 9464
# TLS: set HMLSTM_TLS_CERT and HMLSTM_TLS_KEY (PEM files, e.g. a mounted secret) and the server
# serves TLS; the health check reads the same variables and follows (HMLSTM_TLS_CA for a CA other
# than the certificate itself, HMLSTM_TLS_SERVER_NAME for the name the certificate carries).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["hmlstm", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["hmlstm", "serve"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464", "--device", "cpu"]
