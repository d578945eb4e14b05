# One image for every service; the command picks the service.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY callstream ./callstream
COPY services ./services
COPY schemas ./schemas
RUN pip install --no-cache-dir -e '.[local,transcribe,sentiment]'
ENV PYTHONUNBUFFERED=1
CMD ["python", "-m", "services.ingest.main"]
