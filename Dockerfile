FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY adapters adapters
COPY broker broker
COPY workers workers
RUN pip install --no-cache-dir . && useradd --create-home mergetag
USER mergetag
EXPOSE 8080 8081 8082 8083 8084 8085
CMD ["mergetag", "receiver"]
