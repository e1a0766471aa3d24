/* A leaf device's SAS token from the spyrus-hsm module on its gateway, on mbedTLS 2.28 (what
 * ESP-IDF, Zephyr and most MCU leaves run; Debian's libmbedtls-dev here).
 *
 *   leaf (-b BEARER_FILE | -c CERT -k KEY) [-a ADDRESS] [-t TTL] HOST PORT CAFILE DEVICE_ID
 *
 * Connects to HOST:PORT (or to ADDRESS, still verifying HOST), verifies the service's chain
 * against CAFILE and its certificate against HOST, authenticates with the bearer token in
 * BEARER_FILE (one line; never on the command line) or with a client certificate, asks
 * POST /v1/sas-tokens {"deviceId": DEVICE_ID, "ttlSeconds": TTL} and prints the SAS token on
 * standard output, its remaining life on standard error. The leaf then connects to IoT Hub
 * through edgeHub with it as the MQTT password.
 *
 * Exit status: 0 a token, 1 bad usage or an unreadable file, 2 the connection or the TLS
 * verification failed, 3 the service refused (its status and problem detail are printed).
 *
 * HOST must be a DNS name: mbedTLS 2.28 cannot verify an IP address subjectAltName. On an MCU,
 * replace the file reads with the device's secure storage and mbedtls_net_* with its socket
 * layer; the rest stays. */

#define _GNU_SOURCE
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/net_sockets.h>
#include <mbedtls/platform_util.h>
#include <mbedtls/ssl.h>
#include <mbedtls/x509_crt.h>

#define TIMEOUT_MS 20000
#define MAX_SECRET 512
#define MAX_RESPONSE 16384

static void tls_error(const char *what, int ret)
{
    char text[200];
    mbedtls_strerror(ret, text, sizeof text);
    fprintf(stderr, "error: %s: -0x%04x %s\n", what, (unsigned)-ret, text);
}

/* The first line of a file: the bearer token (a file only its owner can read). */
static int read_secret(const char *path, char *out, size_t size)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        perror(path);
        return -1;
    }
    int ok = fgets(out, (int)size, f) != NULL;
    fclose(f);
    out[ok ? strcspn(out, "\r\n") : 0] = '\0';
    if (!*out) {
        fprintf(stderr, "error: %s holds no bearer token\n", path);
        return -1;
    }
    return 0;
}

/* Only characters a device id may hold, so it can go into the JSON body as it is. */
static int valid_device_id(const char *id)
{
    if (!*id || strlen(id) > 128)
        return 0;
    for (const char *p = id; *p; p++)
        if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.+%_#*?!(),:=@$'", *p))
            return 0;
    return 1;
}

static int write_all(mbedtls_ssl_context *ssl, const char *data, size_t len)
{
    while (len > 0) {
        int ret = mbedtls_ssl_write(ssl, (const unsigned char *)data, len);
        if (ret == MBEDTLS_ERR_SSL_WANT_READ || ret == MBEDTLS_ERR_SSL_WANT_WRITE)
            continue;
        if (ret < 0)
            return ret;
        data += ret;
        len -= (size_t)ret;
    }
    return 0;
}

/* The whole response (the request said Connection: close), NUL-terminated; its length or < 0. */
static int read_all(mbedtls_ssl_context *ssl, char *buf, size_t size)
{
    size_t n = 0;
    for (;;) {
        if (n == size - 1)
            return -1;
        int ret = mbedtls_ssl_read(ssl, (unsigned char *)buf + n, size - 1 - n);
        if (ret == MBEDTLS_ERR_SSL_WANT_READ || ret == MBEDTLS_ERR_SSL_WANT_WRITE)
            continue;
        if (ret == 0 || ret == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY)
            break;
        if (ret < 0)
            return ret;
        n += (size_t)ret;
    }
    buf[n] = '\0';
    return (int)n;
}

/* The string value of "name" in a flat JSON object, unescaped into out (NULL if absent). */
static const char *json_string(const char *json, const char *name, char *out, size_t size)
{
    char key[64];
    snprintf(key, sizeof key, "\"%s\"", name);
    const char *p = strstr(json, key);
    if (!p)
        return NULL;
    p += strlen(key);
    while (*p == ' ' || *p == ':')
        p++;
    if (*p++ != '"')
        return NULL;
    size_t n = 0;
    for (; *p && *p != '"'; p++) {
        if (*p == '\\' && (p[1] == '"' || p[1] == '\\' || p[1] == '/'))
            p++;
        else if (*p == '\\')
            return NULL;  /* \n, \uXXXX, ...: never in a SAS token */
        if (n == size - 1)
            return NULL;
        out[n++] = *p;
    }
    out[n] = '\0';
    return *p == '"' ? out : NULL;
}

int main(int argc, char **argv)
{
    const char *bearer_file = NULL, *cert = NULL, *key = NULL, *address = NULL;
    long ttl = 3600;
    int opt;
    while ((opt = getopt(argc, argv, "b:c:k:a:t:")) != -1) {
        switch (opt) {
        case 'b': bearer_file = optarg; break;
        case 'c': cert = optarg; break;
        case 'k': key = optarg; break;
        case 'a': address = optarg; break;
        case 't': ttl = strtol(optarg, NULL, 10); break;
        default: goto usage;
        }
    }
    if (argc - optind != 4 || (cert == NULL) != (key == NULL) || (bearer_file == NULL) == (cert == NULL) || ttl <= 0)
        goto usage;
    const char *host = argv[optind], *port = argv[optind + 1], *cafile = argv[optind + 2];
    const char *device = argv[optind + 3];
    if (!valid_device_id(device)) {
        fprintf(stderr, "error: '%s' is not a valid IoT Hub device id\n", device);
        return 1;
    }
    char bearer[MAX_SECRET] = "";
    if (bearer_file && read_secret(bearer_file, bearer, sizeof bearer) != 0)
        return 1;

    mbedtls_net_context net;
    mbedtls_ssl_context ssl;
    mbedtls_ssl_config conf;
    mbedtls_x509_crt ca, own;
    mbedtls_pk_context pk;
    mbedtls_entropy_context entropy;
    mbedtls_ctr_drbg_context drbg;
    static char request[1024 + MAX_SECRET], response[MAX_RESPONSE], token[1024];
    int ret, status = 2;
    mbedtls_net_init(&net);
    mbedtls_ssl_init(&ssl);
    mbedtls_ssl_config_init(&conf);
    mbedtls_x509_crt_init(&ca);
    mbedtls_x509_crt_init(&own);
    mbedtls_pk_init(&pk);
    mbedtls_entropy_init(&entropy);
    mbedtls_ctr_drbg_init(&drbg);

    if ((ret = mbedtls_ctr_drbg_seed(&drbg, mbedtls_entropy_func, &entropy, NULL, 0)) != 0) {
        tls_error("seeding the random generator", ret);
        goto out;
    }
    if ((ret = mbedtls_x509_crt_parse_file(&ca, cafile)) != 0) {
        tls_error("loading the CA file", ret);
        status = 1;
        goto out;
    }
    if (cert && ((ret = mbedtls_x509_crt_parse_file(&own, cert)) != 0 ||
                 (ret = mbedtls_pk_parse_keyfile(&pk, key, NULL)) != 0)) {
        tls_error("loading the client certificate and key", ret);
        status = 1;
        goto out;
    }
    if ((ret = mbedtls_ssl_config_defaults(&conf, MBEDTLS_SSL_IS_CLIENT, MBEDTLS_SSL_TRANSPORT_STREAM,
                                           MBEDTLS_SSL_PRESET_DEFAULT)) != 0 ||
        (cert && (ret = mbedtls_ssl_conf_own_cert(&conf, &own, &pk)) != 0)) {
        tls_error("configuring TLS", ret);
        goto out;
    }
    mbedtls_ssl_conf_authmode(&conf, MBEDTLS_SSL_VERIFY_REQUIRED);  /* the chain and the name */
    mbedtls_ssl_conf_ca_chain(&conf, &ca, NULL);
    mbedtls_ssl_conf_rng(&conf, mbedtls_ctr_drbg_random, &drbg);
    mbedtls_ssl_conf_read_timeout(&conf, TIMEOUT_MS);
    if ((ret = mbedtls_ssl_setup(&ssl, &conf)) != 0 || (ret = mbedtls_ssl_set_hostname(&ssl, host)) != 0) {
        tls_error("setting up TLS", ret);
        goto out;
    }
    if ((ret = mbedtls_net_connect(&net, address ? address : host, port, MBEDTLS_NET_PROTO_TCP)) != 0) {
        tls_error("connecting", ret);
        goto out;
    }
    mbedtls_ssl_set_bio(&ssl, &net, mbedtls_net_send, NULL, mbedtls_net_recv_timeout);
    while ((ret = mbedtls_ssl_handshake(&ssl)) != 0) {
        if (ret != MBEDTLS_ERR_SSL_WANT_READ && ret != MBEDTLS_ERR_SSL_WANT_WRITE) {
            tls_error("TLS handshake", ret);
            uint32_t flags = mbedtls_ssl_get_verify_result(&ssl);
            if (flags != 0 && flags != (uint32_t)-1) {
                char info[512];
                mbedtls_x509_crt_verify_info(info, sizeof info, "  ", flags);
                fprintf(stderr, "the service's certificate was not verified:\n%s", info);
            }
            goto out;
        }
    }

    status = 3;
    char body[256];
    int body_len = snprintf(body, sizeof body, "{\"deviceId\": \"%s\", \"ttlSeconds\": %ld}", device, ttl);
    int len = snprintf(request, sizeof request,
                       "POST /v1/sas-tokens HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n"
                       "Content-Type: application/json\r\nContent-Length: %d\r\n%s%s%s\r\n%s",
                       host, port, body_len, bearer[0] ? "Authorization: Bearer " : "", bearer,
                       bearer[0] ? "\r\n" : "", body);
    mbedtls_platform_zeroize(bearer, sizeof bearer);
    ret = len > 0 && (size_t)len < sizeof request ? write_all(&ssl, request, (size_t)len) : -1;
    mbedtls_platform_zeroize(request, sizeof request);
    if (ret != 0) {
        tls_error("sending the request", ret);
        goto out;
    }
    if ((ret = read_all(&ssl, response, sizeof response)) < 0) {
        tls_error("reading the answer", ret);
        goto out;
    }
    int http_status = 0;
    const char *json = strstr(response, "\r\n\r\n");
    if (sscanf(response, "HTTP/1.1 %d", &http_status) != 1 || !json) {
        fprintf(stderr, "error: the answer is not HTTP\n");
        goto out;
    }
    if (http_status != 200) {
        char detail[512];
        fprintf(stderr, "error: the service refused: HTTP %d %s\n", http_status,
                json_string(json, "detail", detail, sizeof detail) ? detail : "");
        goto out;
    }
    char expires[32] = "";
    if (!json_string(json, "token", token, sizeof token)) {
        fprintf(stderr, "error: the answer holds no token\n");
        goto out;
    }
    const char *in = strstr(json, "\"expiresInSeconds\"");
    if (in)
        snprintf(expires, sizeof expires, "%ld", strtol(in + strlen("\"expiresInSeconds\":"), NULL, 10));
    printf("%s\n", token);
    fprintf(stderr, "SAS token for %s, valid for %s s\n", device, expires[0] ? expires : "?");
    status = 0;
    mbedtls_ssl_close_notify(&ssl);
out:
    mbedtls_platform_zeroize(bearer, sizeof bearer);
    mbedtls_platform_zeroize(token, sizeof token);
    mbedtls_net_free(&net);
    mbedtls_ssl_free(&ssl);
    mbedtls_ssl_config_free(&conf);
    mbedtls_x509_crt_free(&ca);
    mbedtls_x509_crt_free(&own);
    mbedtls_pk_free(&pk);
    mbedtls_ctr_drbg_free(&drbg);
    mbedtls_entropy_free(&entropy);
    return status;
usage:
    fprintf(stderr, "usage: %s (-b BEARER_FILE | -c CERT -k KEY) [-a ADDRESS] [-t TTL] HOST PORT CAFILE DEVICE_ID\n",
            argv[0]);
    return 1;
}
