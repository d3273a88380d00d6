/*
 * parma-secret: fetch a secret through the parma-sandbox attestation API (docs/kbs.md).
 *
 *   parma-secret NAME      the secret's bytes on stdout; exit 0
 *                          on failure the API's error message on stderr; exit 1 (2 for usage errors)
 *
 * The API is HTTP on the unix socket /run/parma/attest/api.sock (override: $PARMA_ATTEST_SOCKET),
 * which the agent mounts only into containers whose policy allows it. This client exists for
 * images without curl (`curl --unix-socket ... -d '{"name":"NAME"}' http://x/key/release` does the
 * same). Built static, so it runs in any image.
 */
#define _GNU_SOURCE /* memmem */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/parma/attest/api.sock"
#define MAX_RESPONSE (1024 * 1024)

static int valid_name(const char *s)
{
	size_t n = strlen(s);
	if (n == 0 || n > 128)
		return 0;
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		int alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
		if (!alnum && (i == 0 || (c != '.' && c != '_' && c != '-')))
			return 0;
	}
	return 1;
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/* The API's errors are {"error": "..."}: print the message, unescaped; anything else as it came. */
static void print_error(const char *name, int status, const char *body, size_t len)
{
	static const char key[] = "\"error\": \"";
	const char *p = memmem(body, len, key, sizeof(key) - 1);
	fprintf(stderr, "parma-secret: %s: HTTP %d: ", name, status);
	if (p == NULL) {
		while (len > 0 && (body[len - 1] == '\n' || body[len - 1] == '\r'))
			len--;
		fprintf(stderr, "%.*s\n", (int)len, body);
		return;
	}
	for (p += sizeof(key) - 1; p < body + len && *p != '"'; p++) {
		if (*p == '\\' && p + 1 < body + len) {
			p++;
			fputc(*p == 'n' ? '\n' : *p, stderr);
		} else {
			fputc(*p, stderr);
		}
	}
	fputc('\n', stderr);
}

int main(int argc, char **argv)
{
	if (argc != 2 || !valid_name(argv[1])) {
		fprintf(stderr, "usage: parma-secret NAME   (NAME: 1-128 of A-Z a-z 0-9 . _ -)\n");
		return 2;
	}
	const char *path = getenv("PARMA_ATTEST_SOCKET");
	if (path == NULL || *path == '\0')
		path = DEFAULT_SOCKET;

	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof(addr.sun_path)) {
		fprintf(stderr, "parma-secret: socket path too long: %s\n", path);
		return 1;
	}
	strcpy(addr.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		fprintf(stderr, "parma-secret: cannot connect to %s: %s\n"
			"parma-secret: is 'attestationApi: true' set for this container?\n", path, strerror(errno));
		return 1;
	}

	char body[160], request[512];
	int body_len = snprintf(body, sizeof(body), "{\"name\": \"%s\"}", argv[1]);
	int req_len = snprintf(request, sizeof(request),
			       "POST /key/release HTTP/1.0\r\nHost: localhost\r\n"
			       "Accept: application/octet-stream\r\nContent-Type: application/json\r\n"
			       "Content-Length: %d\r\n\r\n%s", body_len, body);
	if (write_all(fd, request, (size_t)req_len) < 0) {
		fprintf(stderr, "parma-secret: sending the request failed: %s\n", strerror(errno));
		return 1;
	}

	char *response = malloc(MAX_RESPONSE + 1);
	size_t used = 0;
	if (response == NULL)
		return 1;
	for (;;) {
		ssize_t n = read(fd, response + used, MAX_RESPONSE - used);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			fprintf(stderr, "parma-secret: reading the response failed: %s\n", strerror(errno));
			return 1;
		}
		if (n == 0 || used + (size_t)n == MAX_RESPONSE) {
			used += (size_t)n;
			break;
		}
		used += (size_t)n;
	}
	close(fd);
	response[used] = '\0';

	int status = 0;
	char *start = strstr(response, "\r\n\r\n");
	if (sscanf(response, "HTTP/%*d.%*d %d", &status) != 1 || start == NULL) {
		fprintf(stderr, "parma-secret: malformed response from %s\n", path);
		return 1;
	}
	start += 4;
	size_t len = used - (size_t)(start - response);
	if (status != 200) {
		print_error(argv[1], status, start, len);
		return 1;
	}
	if (fwrite(start, 1, len, stdout) != len || fflush(stdout) != 0) {
		fprintf(stderr, "parma-secret: writing the secret failed\n");
		return 1;
	}
	return 0;
}
