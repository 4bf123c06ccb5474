# The production image holds the product only; the vendor sandboxes (test equipment) get an image
# of their own: `docker build --target sandboxes .` (docker compose builds both).
FROM python:3.11-slim AS base
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY adapters adapters
COPY broker broker
COPY workers workers
RUN pip install --no-cache-dir . && useradd --create-home mergetag

FROM base AS sandboxes
COPY sandboxes sandboxes
USER mergetag
ENTRYPOINT ["python", "-m"]

FROM base AS production
USER mergetag
EXPOSE 8080 8083
CMD ["mergetag", "receiver"]
