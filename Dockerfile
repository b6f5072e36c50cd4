# e911-sip: the SIP edge and provisioning API in one image.
#   docker build -t e911-sip .
#   docker run --rm -p 5070:5070/udp -p 5070:5070/tcp -p 9100:9100 -p 9200:9200 \
#       -v e911-state:/var/lib/e911-sip -e E911_SIP__SIP__ADVERTISE=203.0.113.10 ... e911-sip
# config/e911-sip.container.toml lists the environment a deployment sets.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10911 --home-dir /nonexistent --shell /usr/sbin/nologin e911 \
    && install -d -o e911 -g e911 /var/lib/e911-sip
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config /etc/e911-sip
USER e911
# SIP (UDP and TCP), metrics/health, provisioning API.
EXPOSE 5070/udp 5070/tcp 9100/tcp 9200/tcp
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=2)" || exit 1
# SIGTERM drains: in-flight transactions finish and emergency dialogs keep their route.
STOPSIGNAL SIGTERM
ENTRYPOINT ["e911-sip"]
VOLUME ["/var/lib/e911-sip"]
CMD ["serve", "--config", "/etc/e911-sip/e911-sip.container.toml"]
