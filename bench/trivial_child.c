/*
 * trivial_child: the cheapest possible libmilter child milter, for bench/run.
 *
 *     trivial_child -p inet:PORT@127.0.0.1 [-h] [-b BACKLOG]
 *
 * Every callback answers SMFIS_CONTINUE, so the child costs as little as a
 * libmilter milter can and is never the bottleneck of a benchmark. With -h it
 * asks for SMFIF_ADDHDRS and adds "X-Bench: 1" at end of message, which makes
 * the manager relay one modification per message.
 *
 * Built by bench/run: cc -O2 -o BUILD/trivial_child bench/trivial_child.c -lmilter -lpthread
 *
 * SIGTERM, SIGHUP and SIGINT are handled by libmilter's own signal thread,
 * which calls the equivalent of smfi_stop(): smfi_main() returns once the
 * listener notices (up to a few seconds), and the process exits 0.
 */

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libmilter/mfapi.h>

static int add_header;

static sfsistat
on_connect(SMFICTX *ctx, char *hostname, _SOCK_ADDR *address)
{
	return SMFIS_CONTINUE;
}

static sfsistat
on_helo(SMFICTX *ctx, char *name)
{
	return SMFIS_CONTINUE;
}

static sfsistat
on_envfrom(SMFICTX *ctx, char **argv)
{
	return SMFIS_CONTINUE;
}

static sfsistat
on_envrcpt(SMFICTX *ctx, char **argv)
{
	return SMFIS_CONTINUE;
}

static sfsistat
on_data(SMFICTX *ctx)
{
	return SMFIS_CONTINUE;
}

static sfsistat
on_unknown(SMFICTX *ctx, const char *command)
{
	return SMFIS_CONTINUE;
}

static sfsistat
on_header(SMFICTX *ctx, char *name, char *value)
{
	return SMFIS_CONTINUE;
}

static sfsistat
on_eoh(SMFICTX *ctx)
{
	return SMFIS_CONTINUE;
}

static sfsistat
on_body(SMFICTX *ctx, unsigned char *chunk, size_t length)
{
	return SMFIS_CONTINUE;
}

static sfsistat
on_eom(SMFICTX *ctx)
{
	if (add_header && smfi_addheader(ctx, "X-Bench", "1") != MI_SUCCESS)
		return SMFIS_TEMPFAIL;
	return SMFIS_CONTINUE;
}

static sfsistat
on_abort(SMFICTX *ctx)
{
	return SMFIS_CONTINUE;
}

static sfsistat
on_close(SMFICTX *ctx)
{
	return SMFIS_CONTINUE;
}

static struct smfiDesc description = {
	"trivial_child",	/* name */
	SMFI_VERSION,		/* version */
	0,			/* flags; SMFIF_ADDHDRS with -h */
	on_connect,
	on_helo,
	on_envfrom,
	on_envrcpt,
	on_header,
	on_eoh,
	on_body,
	on_eom,
	on_abort,
	on_close,
	on_unknown,
	on_data,
	NULL,			/* negotiate: take what the MTA offers */
};

/*
 * libmilter never sets TCP_NODELAY and hides its listening socket. Linux
 * copies TCP_NODELAY from a listening socket to the sockets it accepts, so
 * find the listener among our descriptors and set it there.
 */
static int
set_nodelay_on_listener(void)
{
	int fd, found = 0;

	for (fd = 0; fd < 1024; fd++) {
		int listening = 0, domain = 0, one = 1;
		socklen_t size = sizeof listening;

		if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &size) != 0 || !listening)
			continue;
		size = sizeof domain;
		if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &size) != 0 ||
		    (domain != AF_INET && domain != AF_INET6))
			continue;
		if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) {
			fprintf(stderr, "trivial_child: TCP_NODELAY: %s\n", strerror(errno));
			return -1;
		}
		found++;
	}
	return found;
}

static void
usage(void)
{
	fprintf(stderr, "usage: trivial_child -p inet:PORT@127.0.0.1 [-h] [-b BACKLOG]\n");
	exit(2);
}

int
main(int argc, char **argv)
{
	const char *spec = NULL;
	int option, backlog = 256;

	while ((option = getopt(argc, argv, "p:hb:")) != -1) {
		switch (option) {
		case 'p':
			spec = optarg;
			break;
		case 'h':
			add_header = 1;
			break;
		case 'b':
			backlog = atoi(optarg);
			break;
		default:
			usage();
		}
	}
	if (spec == NULL || optind != argc)
		usage();
	if (add_header)
		description.xxfi_flags |= SMFIF_ADDHDRS;

	if (smfi_setconn((char *)spec) != MI_SUCCESS ||
	    smfi_setbacklog(backlog) != MI_SUCCESS ||
	    smfi_register(description) != MI_SUCCESS) {
		fprintf(stderr, "trivial_child: cannot set up %s\n", spec);
		return 1;
	}
	if (smfi_opensocket(true) != MI_SUCCESS) {
		fprintf(stderr, "trivial_child: cannot listen on %s\n", spec);
		return 1;
	}
	if (strncmp(spec, "inet", 4) == 0 && set_nodelay_on_listener() < 1) {
		fprintf(stderr, "trivial_child: no TCP listener found for TCP_NODELAY\n");
		return 1;
	}
	return smfi_main() == MI_SUCCESS ? 0 : 1;
}
