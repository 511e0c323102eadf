/*
 * load_generator: milter-test-server's --n-sessions load, in C, for bench/run.
 *
 *     load_generator -s SPEC --script FILE --n-sessions N [--concurrency C]
 *                    [--n-messages-per-session M] [--all-timeouts SECONDS] [--rate R]
 *
 * The Python load generator (milter-test-server --n-sessions) needs most of a
 * core to drive a trivial child at a few thousand messages a second, so it,
 * not the system under test, set the pace. This one speaks the raw milter
 * protocol from one process and one epoll loop and costs a few microseconds
 * per message.
 *
 * It sends exactly what milter-test-server sends: bench/load_script.py writes
 * FILE from milter-test-server's own option parser (the offer, every command
 * packet encoded once, and each stage's macros), and this program applies
 * what the milter negotiated as milter-test-server's client does: commands
 * negotiated away are not sent (their macros are), commands negotiated to
 * get no reply go out in the same write as the next one, a non-empty symbol
 * list filters that stage's macros, SMFIP_HDR_LEADSPC picks the headers with
 * the leading space. A session is negotiate, CONNECT, HELO, then for each
 * message MAIL, RCPT..., DATA, the headers, END_OF_HEADERS, the body and
 * END_OF_MESSAGE (ABORT between messages), then QUIT.
 *
 * Every reply is checked as milter-test-server checks it. A reply that is not
 * allowed where it came (a modification before END_OF_MESSAGE, an unknown
 * code, a malformed packet), a timeout or a lost connection is an error: the
 * session ends and the error is counted. The report has milter-test-server's
 * format (bench/run reads either), plus this process's CPU time:
 *
 *     sessions: N
 *     messages: M
 *     elapsed-time: SECONDS seconds
 *     throughput: RATE messages/s
 *     latency p50/p90/p99/max: A/B/C/D ms
 *     latency p99.9: E ms
 *     sessions-in-flight mean/max: F/G
 *     rate: R messages/s offered, at most C sessions at once      (--rate only)
 *     start-lag p50/p99/max: A/B/C ms                             (--rate only)
 *     command NAME p50/p90/p99/p99.9/max: A/B/C/D/E ms (N replies)
 *     status STATUS: COUNT
 *     error: COUNT × TEXT
 *     generator-cpu: SECONDS seconds (user U, system S)
 *
 * Closed loop (the default, as milter-test-server): C sessions at once, each
 * starting as soon as the one before it in its slot ended. Latency is per
 * message, from its MAIL (the ABORT before it included) to the final reply
 * that ends it. Under load that hides how long a message would have waited
 * for a free slot (coordinated omission).
 *
 * Open loop (--rate R, messages per second): session i is due at
 * i * M / R seconds after the start, whatever the milter does; at most C are
 * in flight, and a due session waits for a free slot. The first message of a
 * session is timed from when the session was due, so the wait for a slot,
 * connecting, NEGOTIATE, CONNECT and HELO count in its latency; later
 * messages of the session (M > 1) from their MAIL. start-lag is how late
 * sessions actually started: near zero unless the slots or this process were
 * the limit.
 *
 * A command's time is from the write that carries it (with the macros and
 * the commands without reply before it) to its final reply: what the milter
 * took to answer it, whatever the schedule. Exit status 0 if any session
 * connected, 1 if none did, 2 on a usage error.
 *
 * Built by bench/run: cc -O2 -o BUILD/load_generator bench/load_generator.c
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PROGRAM "load_generator"
#define MAX_PACKET (1024 * 1024 + 64)	/* the manager's DEFAULT_MAX_PACKET_SIZE, and room */
#define N_STAGES 7			/* macro stages in a symbol list: SMFIM_CONNECT .. SMFIM_EOH */
#define MAX_PLANS 8			/* distinct negotiation replies remembered */

/* Protocol flags (SMFIP_*), as in miltermanager/protocol/constants.py. */
#define SMFIP_NOCONNECT		0x00000001
#define SMFIP_NOHELO		0x00000002
#define SMFIP_NOMAIL		0x00000004
#define SMFIP_NORCPT		0x00000008
#define SMFIP_NOBODY		0x00000010
#define SMFIP_NOHDRS		0x00000020
#define SMFIP_NOEOH		0x00000040
#define SMFIP_NR_HDR		0x00000080
#define SMFIP_NOUNKNOWN		0x00000100
#define SMFIP_NODATA		0x00000200
#define SMFIP_NR_CONN		0x00001000
#define SMFIP_NR_HELO		0x00002000
#define SMFIP_NR_MAIL		0x00004000
#define SMFIP_NR_RCPT		0x00008000
#define SMFIP_NR_DATA		0x00010000
#define SMFIP_NR_UNKN		0x00020000
#define SMFIP_NR_EOH		0x00040000
#define SMFIP_NR_BODY		0x00080000
#define SMFIP_HDR_LEADSPC	0x00100000

static const unsigned char ABORT_PACKET[] = {0, 0, 0, 1, 'A'};
static const unsigned char QUIT_PACKET[] = {0, 0, 0, 1, 'Q'};

/* ------------------------------------------------------------------ small helpers */

struct buffer {
	unsigned char *data;
	size_t length, capacity;
};

static void
die(const char *format, ...)
{
	va_list arguments;

	va_start(arguments, format);
	fprintf(stderr, PROGRAM ": ");
	vfprintf(stderr, format, arguments);
	fputc('\n', stderr);
	va_end(arguments);
	exit(2);
}

static void *
xrealloc(void *pointer, size_t size)
{
	pointer = realloc(pointer, size ? size : 1);
	if (pointer == NULL)
		die("out of memory");
	return pointer;
}

static void
buffer_reserve(struct buffer *buffer, size_t more)
{
	size_t needed = buffer->length + more;

	if (needed <= buffer->capacity)
		return;
	buffer->capacity = buffer->capacity ? buffer->capacity : 256;
	while (buffer->capacity < needed)
		buffer->capacity *= 2;
	buffer->data = xrealloc(buffer->data, buffer->capacity);
}

static void
buffer_add(struct buffer *buffer, const void *data, size_t length)
{
	buffer_reserve(buffer, length);
	memcpy(buffer->data + buffer->length, data, length);
	buffer->length += length;
}

static uint32_t
get32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void
put32(unsigned char *p, uint32_t value)
{
	p[0] = value >> 24;
	p[1] = value >> 16;
	p[2] = value >> 8;
	p[3] = value;
}

static double
now_seconds(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ------------------------------------------------------------------ the script */

struct macro {
	struct buffer name, value;
};

struct step {
	char code;			/* the command's code: C H M R U T L N B E */
	struct buffer packet;		/* the whole packet, length prefix included */
	struct buffer leading_space;	/* headers: the packet with SMFIP_HDR_LEADSPC */
	struct macro *macros;
	int n_macros;
};

static struct {
	struct buffer offer;		/* the NEGOTIATE packet */
	uint32_t version, actions, protocol;
	struct step *steps;
	int n_steps;
	int n_recipients;
} script;

static int
hex_value(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Decode the hex word at *cursor (advancing it) into buffer; "-" is empty. */
static int
read_hex(char **cursor, struct buffer *buffer)
{
	char *p = *cursor;

	while (*p == ' ')
		p++;
	if (*p == '-') {
		*cursor = p + 1;
		return 0;
	}
	while (hex_value(p[0]) >= 0) {
		unsigned char byte;

		if (hex_value(p[1]) < 0)
			return -1;
		byte = hex_value(p[0]) << 4 | hex_value(p[1]);
		buffer_add(buffer, &byte, 1);
		p += 2;
	}
	if (*p != ' ' && *p != '\n' && *p != '\0')
		return -1;
	*cursor = p;
	return 0;
}

/*
 * The script, written by bench/load_script.py, one item a line:
 *     offer HEX                         the NEGOTIATE packet
 *     step CODE HEX [HEX|-]             a command packet (and its leading-space form)
 *     macro NAMEHEX VALUEHEX            a macro sent before the last step
 */
static void
load_script(const char *path)
{
	FILE *file = fopen(path, "r");
	char *line = NULL;
	size_t size = 0;
	int number = 0;

	if (file == NULL)
		die("%s: %s", path, strerror(errno));
	while (getline(&line, &size, file) != -1) {
		char *cursor = line;

		number++;
		if (strncmp(line, "offer ", 6) == 0) {
			cursor += 6;
			if (read_hex(&cursor, &script.offer) < 0 || script.offer.length < 17)
				die("%s:%d: bad offer", path, number);
			script.version = get32(script.offer.data + 5);
			script.actions = get32(script.offer.data + 9);
			script.protocol = get32(script.offer.data + 13);
		} else if (strncmp(line, "step ", 5) == 0 && line[5] && line[6] == ' ') {
			struct step *step;

			script.steps = xrealloc(script.steps, (script.n_steps + 1) * sizeof *script.steps);
			step = &script.steps[script.n_steps++];
			memset(step, 0, sizeof *step);
			step->code = line[5];
			cursor += 7;
			if (read_hex(&cursor, &step->packet) < 0 || step->packet.length < 5 ||
			    step->packet.data[4] != (unsigned char)step->code ||
			    read_hex(&cursor, &step->leading_space) < 0)
				die("%s:%d: bad step", path, number);
			if (step->code == 'R')
				script.n_recipients++;
		} else if (strncmp(line, "macro ", 6) == 0 && script.n_steps) {
			struct step *step = &script.steps[script.n_steps - 1];
			struct macro *macro;

			step->macros = xrealloc(step->macros, (step->n_macros + 1) * sizeof *step->macros);
			macro = &step->macros[step->n_macros++];
			memset(macro, 0, sizeof *macro);
			cursor += 6;
			if (read_hex(&cursor, &macro->name) < 0 || read_hex(&cursor, &macro->value) < 0)
				die("%s:%d: bad macro", path, number);
		} else if (line[0] != '#' && line[0] != '\n') {
			die("%s:%d: unknown line", path, number);
		}
	}
	free(line);
	fclose(file);
	if (script.offer.length == 0 || script.n_steps < 3 || script.steps[0].code != 'C' ||
	    script.steps[1].code != 'H' || script.steps[script.n_steps - 1].code != 'E')
		die("%s: needs an offer and the steps CONNECT, HELO, ..., END_OF_MESSAGE", path);
}

/* ------------------------------------------------------------------ negotiation: the plan */

/*
 * A unit is what goes out in one write: macros and commands up to the first
 * command that gets a reply (code), or to the end of the greeting.
 */
struct unit {
	struct buffer bytes;
	char code;			/* the command whose reply ends the unit; 0: none */
};

struct plan {
	struct buffer reply;		/* the negotiation reply's payload: the key */
	const char *error;		/* the reply is not acceptable: why */
	struct unit *greeting, *transaction;
	int n_greeting, n_transaction;
};

static struct plan plans[MAX_PLANS];
static int n_plans;

static int
macro_stage(char code)
{
	switch (code) {
	case 'C': return 0;
	case 'H': return 1;
	case 'M': return 2;
	case 'R': return 3;
	case 'T': return 4;
	case 'E': return 5;
	case 'N': return 6;
	}
	return -1;
}

static uint32_t
no_flag(char code)
{
	switch (code) {
	case 'C': return SMFIP_NOCONNECT;
	case 'H': return SMFIP_NOHELO;
	case 'M': return SMFIP_NOMAIL;
	case 'R': return SMFIP_NORCPT;
	case 'B': return SMFIP_NOBODY;
	case 'L': return SMFIP_NOHDRS;
	case 'N': return SMFIP_NOEOH;
	case 'U': return SMFIP_NOUNKNOWN;
	case 'T': return SMFIP_NODATA;
	}
	return 0;
}

static uint32_t
no_reply_flag(char code)
{
	switch (code) {
	case 'C': return SMFIP_NR_CONN;
	case 'H': return SMFIP_NR_HELO;
	case 'M': return SMFIP_NR_MAIL;
	case 'R': return SMFIP_NR_RCPT;
	case 'T': return SMFIP_NR_DATA;
	case 'U': return SMFIP_NR_UNKN;
	case 'N': return SMFIP_NR_EOH;
	case 'B': return SMFIP_NR_BODY;
	case 'L': return SMFIP_NR_HDR;
	}
	return 0;
}

/* Is name (or its other form, with or without braces) in the space-separated list? */
static int
macro_wanted(const struct buffer *name, const struct buffer *list)
{
	const unsigned char *p = list->data, *end = list->data + list->length;
	const unsigned char *bare = name->data;
	size_t bare_length = name->length;

	if (bare_length >= 2 && bare[0] == '{' && bare[bare_length - 1] == '}') {
		bare++;
		bare_length -= 2;
	}
	while (p < end) {
		const unsigned char *word = p;
		size_t length;

		while (p < end && *p != ' ')
			p++;
		length = p - word;
		if (length >= 2 && word[0] == '{' && word[length - 1] == '}') {
			word++;
			length -= 2;
		}
		if (length && length == bare_length && memcmp(word, bare, length) == 0)
			return 1;
		while (p < end && *p == ' ')
			p++;
	}
	return 0;
}

static void
add_macro_packet(struct buffer *out, const struct step *step, const struct buffer *wanted)
{
	size_t start = out->length;
	unsigned char header[6];
	int i, added = 0;

	memset(header, 0, 4);
	header[4] = 'D';
	header[5] = step->code;
	buffer_add(out, header, 6);
	for (i = 0; i < step->n_macros; i++) {
		const struct macro *macro = &step->macros[i];

		if (wanted && wanted->length && !macro_wanted(&macro->name, wanted))
			continue;
		buffer_add(out, macro->name.data, macro->name.length);
		buffer_add(out, "", 1);
		buffer_add(out, macro->value.data, macro->value.length);
		buffer_add(out, "", 1);
		added++;
	}
	if (!added) {
		out->length = start;  /* no macros left: no packet, as milter-test-server */
		return;
	}
	put32(out->data + start, out->length - start - 4);
}

static void
close_unit(struct unit **units, int *n, struct buffer *bytes, char code)
{
	struct unit *unit;

	*units = xrealloc(*units, (*n + 1) * sizeof **units);
	unit = &(*units)[(*n)++];
	unit->bytes = *bytes;
	unit->code = code;
	memset(bytes, 0, sizeof *bytes);
}

/* What a negotiation reply (its payload) makes of the script, computed once per distinct reply. */
static struct plan *
plan_for(const unsigned char *payload, size_t length)
{
	struct buffer wanted[N_STAGES];
	struct buffer bytes = {0};
	struct plan *plan;
	uint32_t version, actions, protocol;
	size_t position;
	int i;

	for (i = 0; i < n_plans; i++)
		if (plans[i].reply.length == length && memcmp(plans[i].reply.data, payload, length) == 0)
			return &plans[i];
	if (n_plans == MAX_PLANS) {  /* a milter that answers differently each time: forget one */
		n_plans--;
		free(plans[n_plans].reply.data);
	}
	plan = &plans[n_plans++];
	memset(plan, 0, sizeof *plan);
	buffer_add(&plan->reply, payload, length);
	if (length < 12) {
		plan->error = "negotiate reply: fewer than 12 bytes";
		return plan;
	}
	version = get32(payload);
	actions = get32(payload + 4);
	protocol = get32(payload + 8) & script.protocol;
	if (version < 2 || version > script.version) {
		plan->error = "negotiate reply: a protocol version that was not offered";
		return plan;
	}
	if (actions & ~script.actions) {
		plan->error = "negotiate reply: actions that were not offered";
		return plan;
	}
	memset(wanted, 0, sizeof wanted);
	for (position = 12; position < length;) {
		const unsigned char *names, *nul;
		uint32_t stage;

		if (length - position < 5) {
			plan->error = "negotiate reply: truncated symbol list";
			return plan;
		}
		stage = get32(payload + position);
		names = payload + position + 4;
		nul = memchr(names, 0, payload + length - names);
		if (nul == NULL) {
			plan->error = "negotiate reply: symbol list not terminated by NUL";
			return plan;
		}
		if (stage < N_STAGES) {
			const unsigned char *p;

			wanted[stage].length = 0;
			for (p = names; p < nul; p++) {
				unsigned char c = *p;

				if (c == ',' || c == '\t' || c == '\r' || c == '\n')
					c = ' ';
				buffer_add(&wanted[stage], &c, 1);
			}
		}
		position = nul - payload + 1;
	}
	for (i = 0; i < script.n_steps; i++) {
		const struct step *step = &script.steps[i];
		int stage = macro_stage(step->code);
		int sends = !(protocol & no_flag(step->code)) &&
			!(step->code == 'U' && version < 3) && !(step->code == 'T' && version < 4);

		if (i == 2 && bytes.length)  /* the greeting ends with commands that get no reply */
			close_unit(&plan->greeting, &plan->n_greeting, &bytes, 0);
		if (step->n_macros)
			add_macro_packet(&bytes, step, stage >= 0 ? &wanted[stage] : NULL);
		if (!sends)
			continue;
		if (step->code == 'L' && protocol & SMFIP_HDR_LEADSPC && step->leading_space.length)
			buffer_add(&bytes, step->leading_space.data, step->leading_space.length);
		else
			buffer_add(&bytes, step->packet.data, step->packet.length);
		if (protocol & no_reply_flag(step->code))
			continue;
		if (i < 2)
			close_unit(&plan->greeting, &plan->n_greeting, &bytes, step->code);
		else
			close_unit(&plan->transaction, &plan->n_transaction, &bytes, step->code);
	}
	for (i = 0; i < N_STAGES; i++)
		free(wanted[i].data);
	return plan;
}

/* ------------------------------------------------------------------ the report */

struct count {
	char *text;
	long count;
};

static struct count *statuses, *errors;
static int n_statuses, n_errors;

static void
count(struct count **table, int *n, const char *text)
{
	int i;

	for (i = 0; i < *n; i++)
		if (strcmp((*table)[i].text, text) == 0) {
			(*table)[i].count++;
			return;
		}
	*table = xrealloc(*table, (*n + 1) * sizeof **table);
	(*table)[*n].text = strdup(text);
	(*table)[*n].count = 1;
	(*n)++;
}

static int
by_text(const void *a, const void *b)
{
	return strcmp(((const struct count *)a)->text, ((const struct count *)b)->text);
}

static int
by_count(const void *a, const void *b)
{
	long x = ((const struct count *)a)->count, y = ((const struct count *)b)->count;

	return x < y ? 1 : x > y ? -1 : 0;
}

static int
by_value(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

/* Timings in seconds, sorted by report() before percentile() reads them. */
struct series {
	double *values;
	long n, capacity;
};

static struct series latencies;		/* per message */
static struct series lags;		/* --rate: how late each session started */
static struct series command_times[256];	/* per command code: its write to its reply */
static long n_messages, n_sessions_connected;

static void
series_add(struct series *series, double value)
{
	if (series->n == series->capacity) {
		series->capacity = series->capacity ? 2 * series->capacity : 1024;
		series->values = xrealloc(series->values, series->capacity * sizeof *series->values);
	}
	series->values[series->n++] = value;
}

static double
percentile(const struct series *series, double fraction)
{
	long rank;

	if (series->n == 0)
		return 0.0;
	rank = (long)(fraction * series->n);
	if (rank < fraction * series->n)
		rank++;  /* nearest rank: ceil */
	if (rank < 1)
		rank = 1;
	if (rank > series->n)
		rank = series->n;
	return series->values[rank - 1];
}

/* ------------------------------------------------------------------ sessions */

enum phase { CONNECTING, NEGOTIATING, GREETING, TRANSACTION };

struct session {
	int fd;
	enum phase phase;
	struct plan *plan;
	int unit;			/* index into the plan's greeting or transaction */
	char waiting;			/* the command whose reply is awaited; 0: none */
	int messages;			/* messages done in this session */
	int refused;			/* recipients refused in this transaction */
	double started;			/* this message's start */
	double scheduled;		/* --rate: when this session was due to start */
	double began;			/* when it started */
	double sent;			/* when the unit awaiting a reply was written */
	double deadline;
	struct buffer out;
	size_t out_sent;
	int polling_out;
	struct buffer in;
};

static struct {
	struct sockaddr_storage address;
	socklen_t address_length;
	int family;
	long n_sessions, started_sessions;
	int concurrency, per_session;
	double rate;			/* --rate: messages per second on a fixed schedule; 0: closed loop */
	double first_start;		/* the schedule's origin */
	double reading_timeout, end_of_message_timeout, connection_timeout;
	int epoll;
	int active;			/* sessions started and not ended */
	int most_active;
	double session_seconds;		/* the sessions' durations added up: the mean in flight */
	struct session **idle;		/* slots whose session ended */
	int n_idle;
	double now;
} load;

static const char *
command_name(char code)
{
	switch (code) {
	case 'O': return "NEGOTIATE";
	case 'C': return "CONNECT";
	case 'H': return "HELO";
	case 'M': return "MAIL";
	case 'R': return "RCPT";
	case 'U': return "UNKNOWN";
	case 'T': return "DATA";
	case 'L': return "HEADER";
	case 'N': return "END_OF_HEADERS";
	case 'B': return "BODY";
	case 'E': return "END_OF_MESSAGE";
	}
	return "?";
}

static void
end_session(struct session *session, int quit)
{
	if (quit && session->fd >= 0) {
		/* Best effort, like Twisted's loseConnection: the socket's buffer is empty. */
		ssize_t ignored = send(session->fd, QUIT_PACKET, sizeof QUIT_PACKET, MSG_NOSIGNAL);

		(void)ignored;
	}
	if (session->fd >= 0)
		close(session->fd);
	session->fd = -1;
	load.session_seconds += now_seconds() - session->began;
	load.active--;
	load.idle[load.n_idle++] = session;  /* the main loop starts the next session in it */
}

static void
fail(struct session *session, const char *format, ...)
{
	char text[512];
	va_list arguments;

	va_start(arguments, format);
	vsnprintf(text, sizeof text, format, arguments);
	va_end(arguments);
	count(&errors, &n_errors, text);
	end_session(session, 0);
}

static void
poll_out(struct session *session, int on)
{
	struct epoll_event event = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = session};

	if (session->polling_out == on)
		return;
	session->polling_out = on;
	epoll_ctl(load.epoll, EPOLL_CTL_MOD, session->fd, &event);
}

/* Write what is queued; 0, or -1 when the session failed (and ended). */
static int
flush(struct session *session)
{
	struct buffer *out = &session->out;

	while (session->out_sent < out->length) {
		ssize_t written = send(session->fd, out->data + session->out_sent,
				       out->length - session->out_sent, MSG_NOSIGNAL);

		if (written < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN) {
				poll_out(session, 1);
				return 0;
			}
			fail(session, "writing: %s", strerror(errno));
			return -1;
		}
		session->out_sent += written;
	}
	out->length = session->out_sent = 0;
	poll_out(session, 0);
	return 0;
}

static void
wait_for(struct session *session, char code)
{
	session->waiting = code;
	session->sent = now_seconds();
	session->deadline = load.now +
		(code == 'E' ? load.end_of_message_timeout : load.reading_timeout);
}

/* Queue units from session->unit on, up to one that gets a reply; then write. */
static int
run_units(struct session *session)
{
	for (;;) {
		const struct plan *plan = session->plan;
		const struct unit *units = session->phase == GREETING ? plan->greeting : plan->transaction;
		int n = session->phase == GREETING ? plan->n_greeting : plan->n_transaction;

		if (session->unit == n) {  /* the greeting is over (END_OF_MESSAGE always gets a reply) */
			session->phase = TRANSACTION;
			session->unit = 0;
			session->refused = 0;
			/* open loop: the first message waited for its session's start too */
			session->started = load.rate ? session->scheduled : now_seconds();
			continue;
		}
		buffer_add(&session->out, units[session->unit].bytes.data, units[session->unit].bytes.length);
		if (units[session->unit].code) {
			wait_for(session, units[session->unit].code);
			return flush(session);
		}
		session->unit++;
	}
}

static void
quick_ack(struct session *session)
{
	int one = 1;

	/* libmilter writes end-of-message packets one by one with Nagle on: see sockets.quick_ack */
	if (load.family != AF_UNIX)
		setsockopt(session->fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
}

/* When session number (from 0) is due under --rate. */
static double
due(long number)
{
	return load.first_start + number * load.per_session / load.rate;
}

static void
start_session(struct session *session)
{
	int fd, one = 1;
	ssize_t sent;
	struct epoll_event event = {.events = EPOLLOUT, .data.ptr = session};

	session->began = now_seconds();
	if (load.rate) {
		session->scheduled = due(load.started_sessions);
		series_add(&lags, session->began - session->scheduled);
	}
	load.started_sessions++;
	if (++load.active > load.most_active)
		load.most_active = load.active;
	session->fd = -1;
	session->phase = CONNECTING;
	session->plan = NULL;
	session->unit = session->messages = session->refused = 0;
	session->waiting = 0;
	session->out.length = session->out_sent = 0;
	session->in.length = 0;
	session->polling_out = 1;
	session->deadline = load.now + load.connection_timeout;
	fd = socket(load.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		fail(session, "socket: %s", strerror(errno));
		return;
	}
	session->fd = fd;
	if (load.family != AF_UNIX)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	if (connect(fd, (struct sockaddr *)&load.address, load.address_length) < 0 &&
	    errno != EINPROGRESS && errno != EAGAIN) {
		fail(session, "connect: %s", strerror(errno));
		return;
	}
	/*
	 * On loopback the handshake is usually over when connect() returns: send
	 * the offer at once, and wait for writability only if it is not.
	 */
	buffer_add(&session->out, script.offer.data, script.offer.length);
	sent = send(fd, session->out.data, session->out.length, MSG_NOSIGNAL);
	if (sent < 0 && errno != EAGAIN) {
		fail(session, "connect: %s", strerror(errno));
		return;
	}
	if (sent > 0) {
		session->out_sent = sent;
		n_sessions_connected++;
		session->phase = NEGOTIATING;
		wait_for(session, 'O');
		if (session->out_sent == session->out.length) {
			session->out.length = session->out_sent = 0;
			session->polling_out = 0;
			event.events = EPOLLIN;
		} else {
			event.events = EPOLLIN | EPOLLOUT;
		}
	}
	if (epoll_ctl(load.epoll, EPOLL_CTL_ADD, fd, &event) < 0)
		fail(session, "epoll_ctl: %s", strerror(errno));
}

static void
connected(struct session *session)
{
	int problem = 0;
	socklen_t size = sizeof problem;

	if (getsockopt(session->fd, SOL_SOCKET, SO_ERROR, &problem, &size) < 0)
		problem = errno;
	if (problem) {
		fail(session, "connect: %s", strerror(problem));
		return;
	}
	n_sessions_connected++;
	session->phase = NEGOTIATING;  /* the offer is queued already */
	wait_for(session, 'O');
	flush(session);
}

static int
next_message(struct session *session)
{
	if (session->messages == load.per_session) {
		end_session(session, 1);
		return -1;
	}
	buffer_add(&session->out, ABORT_PACKET, sizeof ABORT_PACKET);  /* as Postfix between transactions */
	session->unit = 0;
	session->refused = 0;
	session->started = now_seconds();
	return run_units(session);
}

/* The message ended with status; go on with the next one or end the session. */
static int
message_done(struct session *session, const char *status)
{
	double ended = now_seconds();

	series_add(&latencies, ended - session->started);
	n_messages++;
	count(&statuses, &n_statuses, status);
	session->messages++;
	session->waiting = 0;
	if (strcmp(status, "shutdown") == 0) {
		end_session(session, 1);
		return -1;
	}
	return next_message(session);
}

/* One reply; 0 to go on reading, -1 when the session ended. */
static int
on_reply(struct session *session, unsigned char code, const unsigned char *payload, size_t length)
{
	char waiting = session->waiting;
	const char *status = NULL;

	if (waiting == 0) {
		fail(session, "unexpected reply '%c': no command is waiting for one", code);
		return -1;
	}
	if (waiting == 'O') {
		if (code != 'O') {
			fail(session, "'%c' in reply to NEGOTIATE", code);
			return -1;
		}
		series_add(&command_times['O'], now_seconds() - session->sent);
		session->plan = plan_for(payload, length);
		if (session->plan->error) {
			fail(session, "%s", session->plan->error);
			return -1;
		}
		session->phase = GREETING;
		session->unit = 0;
		return run_units(session);
	}
	switch (code) {
	case 'c':
	case 's':
		break;
	case 'a': status = "accept"; break;
	case 'r': status = "reject"; break;
	case 't': status = "temporary-failure"; break;
	case 'd': status = "discard"; break;
	case '4': status = "shutdown"; break;
	case 'y':
		if (length < 1 || payload[length - 1] != 0) {
			fail(session, "reply code: not a NUL-terminated string");
			return -1;
		}
		status = payload[0] == '4' ? "temporary-failure" : "reject";
		break;
	case 'p':
		if (waiting != 'E') {
			fail(session, "progress in reply to %s: allowed only at END_OF_MESSAGE",
			     command_name(waiting));
			return -1;
		}
		session->deadline = load.now + load.end_of_message_timeout;
		return 0;
	case 'q':
		return 0;  /* a quarantine: Postfix takes it after any command */
	case '+': case '-': case '2': case 'b': case 'e': case 'h': case 'i': case 'm':
		if (waiting != 'E') {
			fail(session, "'%c' in reply to %s: modifications are allowed only at END_OF_MESSAGE",
			     code, command_name(waiting));
			return -1;
		}
		return 0;
	case 'O':
		fail(session, "negotiate reply to %s", command_name(waiting));
		return -1;
	default:
		fail(session, "unknown reply code 0x%02x in reply to %s", code, command_name(waiting));
		return -1;
	}
	series_add(&command_times[(unsigned char)waiting], now_seconds() - session->sent);
	if (session->phase == GREETING) {
		if (status) {
			char text[64];

			snprintf(text, sizeof text, "%s at %s", status, waiting == 'C' ? "connect" : "helo");
			count(&statuses, &n_statuses, text);
			session->out.length = session->out_sent = 0;
			buffer_add(&session->out, ABORT_PACKET, sizeof ABORT_PACKET);
			flush(session);
			end_session(session, 1);
			return -1;
		}
		session->unit++;
		return run_units(session);
	}
	if (waiting == 'R' && status && (strcmp(status, "reject") == 0 ||
					 strcmp(status, "temporary-failure") == 0)) {
		if (++session->refused < script.n_recipients)
			status = NULL;  /* dropped while other recipients remain */
	}
	if (status)
		return message_done(session, status);
	if (waiting == 'E')
		return message_done(session, "pass");
	if (waiting == 'B' && code == 's')  /* the milter wants no more of the body */
		session->unit = session->plan->n_transaction - 1;
	else
		session->unit++;
	if (session->unit == session->plan->n_transaction - 1)
		quick_ack(session);
	return run_units(session);
}

static void
readable(struct session *session)
{
	struct buffer *in = &session->in;
	size_t position = 0;
	int at_end_of_message = session->waiting == 'E';

	for (;;) {
		ssize_t got;

		buffer_reserve(in, 4096);
		got = recv(session->fd, in->data + in->length, in->capacity - in->length, 0);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				break;
			fail(session, "connection lost waiting for the reply to %s: %s",
			     command_name(session->waiting), strerror(errno));
			return;
		}
		if (got == 0) {
			fail(session, "connection lost waiting for the reply to %s",
			     command_name(session->waiting));
			return;
		}
		in->length += got;
		if (in->length < in->capacity)
			break;
	}
	while (in->length - position >= 5) {
		uint32_t length = get32(in->data + position);

		if (length == 0 || length > MAX_PACKET) {
			fail(session, "bad packet length %u", length);
			return;
		}
		if (in->length - position - 4 < length)
			break;
		if (on_reply(session, in->data[position + 4], in->data + position + 5, length - 1) < 0)
			return;
		position += 4 + length;
	}
	if (position) {
		memmove(in->data, in->data + position, in->length - position);
		in->length -= position;
	}
	if (at_end_of_message && session->waiting == 'E')
		quick_ack(session);  /* part of the end-of-message reply came: ACK the rest at once too */
}

static void
check_deadlines(struct session *sessions, int n)
{
	int i;

	for (i = 0; i < n; i++) {
		struct session *session = &sessions[i];

		if (session->fd < 0 || session->deadline > load.now)
			continue;
		if (session->phase == CONNECTING)
			fail(session, "connect: timed out");
		else
			fail(session, "timed out waiting for the reply to %s", command_name(session->waiting));
	}
}

/* ------------------------------------------------------------------ main */

static void
parse_spec(const char *spec)
{
	const char *rest, *at;
	char host[256], port[16];
	struct addrinfo hints, *found;
	int family = AF_UNSPEC, status;

	memset(&load.address, 0, sizeof load.address);
	if (spec[0] == '/' || strncasecmp(spec, "unix:", 5) == 0 || strncasecmp(spec, "local:", 6) == 0) {
		struct sockaddr_un *address = (struct sockaddr_un *)&load.address;
		const char *path = spec[0] == '/' ? spec : strchr(spec, ':') + 1;

		if (strlen(path) >= sizeof address->sun_path || !*path)
			die("%s: bad unix socket path", spec);
		address->sun_family = AF_UNIX;
		strcpy(address->sun_path, path);
		load.family = AF_UNIX;
		load.address_length = sizeof *address;
		return;
	}
	if (strncasecmp(spec, "inet:", 5) == 0) {
		family = AF_INET;
		rest = spec + 5;
	} else if (strncasecmp(spec, "inet6:", 6) == 0) {
		family = AF_INET6;
		rest = spec + 6;
	} else {
		die("%s: not unix:PATH, inet:PORT@HOST or inet6:PORT@HOST", spec);
	}
	at = strchr(rest, '@');
	if (at) {  /* PORT@HOST, PORT@[ADDRESS] */
		snprintf(port, sizeof port, "%.*s", (int)(at - rest), rest);
		snprintf(host, sizeof host, "%s", at + 1);
	} else if (strrchr(rest, ':')) {  /* HOST:PORT, [ADDRESS]:PORT */
		const char *colon = strrchr(rest, ':');

		snprintf(host, sizeof host, "%.*s", (int)(colon - rest), rest);
		snprintf(port, sizeof port, "%s", colon + 1);
	} else {
		snprintf(port, sizeof port, "%s", rest);
		snprintf(host, sizeof host, "%s", family == AF_INET6 ? "::1" : "127.0.0.1");
	}
	if (host[0] == '[' && host[strlen(host) - 1] == ']') {
		memmove(host, host + 1, strlen(host));
		host[strlen(host) - 1] = '\0';
	}
	memset(&hints, 0, sizeof hints);
	hints.ai_family = strchr(host, ':') ? AF_INET6 : family;
	hints.ai_socktype = SOCK_STREAM;
	status = getaddrinfo(host, port, &hints, &found);
	if (status != 0)
		die("%s: %s", spec, gai_strerror(status));
	memcpy(&load.address, found->ai_addr, found->ai_addrlen);
	load.address_length = found->ai_addrlen;
	load.family = found->ai_family;
	freeaddrinfo(found);
}

/* epoll_wait to the nanosecond (epoll_pwait2, Linux 5.11), else rounded up to the millisecond. */
static int
wait_events(struct epoll_event *events, int size, const struct timespec *timeout)
{
	static int no_pwait2;

	if (!no_pwait2) {
		int n = epoll_pwait2(load.epoll, events, size, timeout, NULL);

		if (n >= 0 || errno != ENOSYS)
			return n;
		no_pwait2 = 1;
	}
	return epoll_wait(load.epoll, events, size,
			  timeout->tv_sec * 1000 + (timeout->tv_nsec + 999999) / 1000000);
}

static void
usage(void)
{
	fprintf(stderr,
		"usage: " PROGRAM " -s SPEC --script FILE --n-sessions N [--concurrency C]\n"
		"       [--n-messages-per-session M] [--all-timeouts SECONDS] [--rate R]\n"
		"SPEC: unix:PATH, inet:PORT@HOST, inet6:PORT@HOST; FILE: from bench/load_script.py\n");
	exit(2);
}

static long
positive(const char *text, const char *option)
{
	char *end;
	long value = strtol(text, &end, 10);

	if (*text == '\0' || *end != '\0' || value < 1)
		die("%s: must be a whole number of at least 1: %s", option, text);
	return value;
}

static void
report(double elapsed)
{
	struct rusage usage;
	double cpu_user, cpu_system;
	int i;

	static const char order[] = "OCHMRUTLNBE";  /* commands in the order they are sent */

	qsort(latencies.values, latencies.n, sizeof *latencies.values, by_value);
	qsort(lags.values, lags.n, sizeof *lags.values, by_value);
	qsort(statuses, n_statuses, sizeof *statuses, by_text);
	qsort(errors, n_errors, sizeof *errors, by_count);
	printf("sessions: %ld\n", n_sessions_connected);
	printf("messages: %ld\n", n_messages);
	printf("elapsed-time: %g seconds\n", elapsed);
	printf("throughput: %.1f messages/s\n", elapsed > 0 ? n_messages / elapsed : 0.0);
	printf("latency p50/p90/p99/max: %.2f/%.2f/%.2f/%.2f ms\n", 1000 * percentile(&latencies, 0.5),
	       1000 * percentile(&latencies, 0.9), 1000 * percentile(&latencies, 0.99),
	       1000 * percentile(&latencies, 1.0));
	printf("latency p99.9: %.2f ms\n", 1000 * percentile(&latencies, 0.999));
	printf("sessions-in-flight mean/max: %.2f/%d\n",
	       elapsed > 0 ? load.session_seconds / elapsed : 0.0, load.most_active);
	if (load.rate) {
		printf("rate: %.1f messages/s offered, at most %d sessions at once\n",
		       load.rate, load.concurrency);
		printf("start-lag p50/p99/max: %.3f/%.3f/%.3f ms\n", 1000 * percentile(&lags, 0.5),
		       1000 * percentile(&lags, 0.99), 1000 * percentile(&lags, 1.0));
	}
	for (i = 0; order[i]; i++) {
		struct series *times = &command_times[(unsigned char)order[i]];

		if (times->n == 0)
			continue;
		qsort(times->values, times->n, sizeof *times->values, by_value);
		printf("command %s p50/p90/p99/p99.9/max: %.3f/%.3f/%.3f/%.3f/%.3f ms (%ld replies)\n",
		       command_name(order[i]), 1000 * percentile(times, 0.5), 1000 * percentile(times, 0.9),
		       1000 * percentile(times, 0.99), 1000 * percentile(times, 0.999),
		       1000 * percentile(times, 1.0), times->n);
	}
	for (i = 0; i < n_statuses; i++)
		printf("status %s: %ld\n", statuses[i].text, statuses[i].count);
	for (i = 0; i < n_errors; i++)
		printf("error: %ld \u00d7 %s\n", errors[i].count, errors[i].text);
	getrusage(RUSAGE_SELF, &usage);
	cpu_user = usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6;
	cpu_system = usage.ru_stime.tv_sec + usage.ru_stime.tv_usec / 1e6;
	printf("generator-cpu: %.3f seconds (user %.3f, system %.3f)\n",
	       cpu_user + cpu_system, cpu_user, cpu_system);
}

int
main(int argc, char **argv)
{
	static const struct option options[] = {
		{"connection-spec", required_argument, NULL, 's'},
		{"script", required_argument, NULL, 'f'},
		{"n-sessions", required_argument, NULL, 'n'},
		{"concurrency", required_argument, NULL, 'c'},
		{"n-messages-per-session", required_argument, NULL, 'm'},
		{"all-timeouts", required_argument, NULL, 't'},
		{"rate", required_argument, NULL, 'r'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	const char *spec = NULL, *script_path = NULL;
	struct epoll_event events[256];
	struct session *sessions;
	double started, last_scan;
	int option, i;

	load.concurrency = 1;
	load.per_session = 1;
	load.reading_timeout = 10;  /* milter-test-server's defaults */
	load.end_of_message_timeout = 300;
	load.connection_timeout = 300;
	while ((option = getopt_long(argc, argv, "s:", options, NULL)) != -1) {
		switch (option) {
		case 's': spec = optarg; break;
		case 'f': script_path = optarg; break;
		case 'n': load.n_sessions = positive(optarg, "--n-sessions"); break;
		case 'c': load.concurrency = positive(optarg, "--concurrency"); break;
		case 'm': load.per_session = positive(optarg, "--n-messages-per-session"); break;
		case 't': {
			char *end;
			double seconds = strtod(optarg, &end);

			if (*end || !(seconds > 0))
				die("--all-timeouts: not a positive number of seconds: %s", optarg);
			load.reading_timeout = load.end_of_message_timeout = load.connection_timeout = seconds;
			break;
		}
		case 'r': {
			char *end;

			load.rate = strtod(optarg, &end);
			if (*optarg == '\0' || *end || !(load.rate > 0) || load.rate > 1e7)
				die("--rate: not a positive number of messages per second: %s", optarg);
			break;
		}
		default: usage();
		}
	}
	if (spec == NULL || script_path == NULL || load.n_sessions == 0 || optind != argc)
		usage();
	parse_spec(spec);
	load_script(script_path);
	signal(SIGPIPE, SIG_IGN);
	if (load.concurrency > load.n_sessions)
		load.concurrency = load.n_sessions;
	sessions = calloc(load.concurrency, sizeof *sessions);
	load.epoll = epoll_create1(EPOLL_CLOEXEC);
	if (sessions == NULL || load.epoll < 0)
		die("setting up: %s", strerror(errno));
	started = last_scan = load.now = load.first_start = now_seconds();
	load.idle = xrealloc(NULL, load.concurrency * sizeof *load.idle);
	for (i = 0; i < load.concurrency; i++) {
		sessions[i].fd = -1;
		load.idle[load.n_idle++] = &sessions[load.concurrency - 1 - i];
	}
	for (;;) {
		struct timespec wait = {0, 100 * 1000 * 1000};
		int n;

		/* closed loop: a session whenever a slot is free; --rate: also only once it is due */
		if (load.rate)
			load.now = now_seconds();
		while (load.n_idle && load.started_sessions < load.n_sessions &&
		       (!load.rate || due(load.started_sessions) <= load.now))
			start_session(load.idle[--load.n_idle]);
		if (load.active == 0 && load.started_sessions == load.n_sessions)
			break;
		if (load.rate && load.n_idle && load.started_sessions < load.n_sessions) {
			double until = due(load.started_sessions) - now_seconds();

			if (until < 0)
				until = 0;
			if (until < 0.1) {
				wait.tv_sec = 0;
				wait.tv_nsec = until * 1e9;
			}
		}
		n = wait_events(events, sizeof events / sizeof *events, &wait);

		if (n < 0 && errno != EINTR)
			die("epoll_wait: %s", strerror(errno));
		load.now = now_seconds();
		for (i = 0; i < n; i++) {
			struct session *session = events[i].data.ptr;

			if (session->fd < 0)
				continue;
			if (session->phase == CONNECTING) {
				connected(session);
				continue;
			}
			if (events[i].events & EPOLLOUT && flush(session) < 0)
				continue;
			if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
				readable(session);
		}
		if (load.now - last_scan >= 0.1) {
			last_scan = load.now;
			check_deadlines(sessions, load.concurrency);
		}
	}
	report(now_seconds() - started);
	return n_sessions_connected ? 0 : 1;
}
