-- amavis' SQL lookup tables (@lookup_sql_dsn) in a database `amavis`, with the table and
-- column names, types and defaults of the MySQL schema in amavisd-new's README.sql-mysql
-- (2.13.0, Debian 12: /usr/share/doc/amavisd-new/README.sql-mysql.gz): users, mailaddr,
-- wblist, policy. The R/W logging and quarantine tables (maddr, msgs, msgrcpt, quarantine)
-- are not part of the lookups and are left out. policy.spam_modifies_subj is absent: amavis
-- retired it (RELEASE_NOTES, README.sql-pg: ALTER TABLE policy DROP COLUMN spam_modifies_subj).
--
-- users.email and mailaddr.email are VARBINARY as amavis recommends (addresses are octets,
-- RFC 5321): drivers return them as bytes. The Y/N flags and the levels are NULL by
-- default, meaning "not set here, fall back to the global setting".
--
-- No rows: each test inserts what it needs. Loaded as root after mail.sql (which creates
-- mail_admin); mail_admin gets SELECT here too.

CREATE DATABASE amavis;
USE amavis;

-- local users
CREATE TABLE users (
  id         int unsigned NOT NULL AUTO_INCREMENT PRIMARY KEY,
  priority   integer      NOT NULL DEFAULT '7',       -- sort field, 0 is low priority
  policy_id  integer unsigned NOT NULL DEFAULT '1',   -- joins policy.id
  email      varbinary(255) NOT NULL UNIQUE,          -- full address, @domain, @.domain or @.
  fullname   varchar(255) DEFAULT NULL                -- not used by amavis
);

-- any address (local or not) used as a sender in wblist
CREATE TABLE mailaddr (
  id         int unsigned NOT NULL AUTO_INCREMENT PRIMARY KEY,
  priority   integer      NOT NULL DEFAULT '7',       -- 0 is low priority
  email      varbinary(255) NOT NULL UNIQUE
);

-- per-recipient white/blacklist: recipient users.id, sender mailaddr.id
CREATE TABLE wblist (
  rid        integer unsigned NOT NULL,               -- recipient: users.id
  sid        integer unsigned NOT NULL,               -- sender: mailaddr.id
  wb         varchar(10)  NOT NULL,                   -- W or Y / B or N / space / a score
  PRIMARY KEY (rid, sid)
);

CREATE TABLE policy (
  id  int unsigned NOT NULL AUTO_INCREMENT PRIMARY KEY,  -- the only required field
  policy_name      varchar(32),                          -- a comment, not used by amavis

  virus_lover           char(1) default NULL,     -- Y/N
  spam_lover            char(1) default NULL,     -- Y/N
  unchecked_lover       char(1) default NULL,     -- Y/N
  banned_files_lover    char(1) default NULL,     -- Y/N
  bad_header_lover      char(1) default NULL,     -- Y/N

  bypass_virus_checks   char(1) default NULL,     -- Y/N
  bypass_spam_checks    char(1) default NULL,     -- Y/N
  bypass_banned_checks  char(1) default NULL,     -- Y/N
  bypass_header_checks  char(1) default NULL,     -- Y/N

  virus_quarantine_to      varchar(64) default NULL,
  spam_quarantine_to       varchar(64) default NULL,
  banned_quarantine_to     varchar(64) default NULL,
  unchecked_quarantine_to  varchar(64) default NULL,
  bad_header_quarantine_to varchar(64) default NULL,
  clean_quarantine_to      varchar(64) default NULL,
  archive_quarantine_to    varchar(64) default NULL,

  spam_tag_level  float default NULL,             -- at or above: spam info header fields
  spam_tag2_level float default NULL,             -- "declared spam" header fields
  spam_tag3_level float default NULL,             -- "blatant spam" header fields
  spam_kill_level float default NULL,             -- evasive action (final_spam_destiny)
  spam_dsn_cutoff_level        float default NULL,
  spam_quarantine_cutoff_level float default NULL,

  addr_extension_virus      varchar(64) default NULL,
  addr_extension_spam       varchar(64) default NULL,
  addr_extension_banned     varchar(64) default NULL,
  addr_extension_bad_header varchar(64) default NULL,

  warnvirusrecip      char(1)     default NULL,   -- Y/N
  warnbannedrecip     char(1)     default NULL,   -- Y/N
  warnbadhrecip       char(1)     default NULL,   -- Y/N
  newvirus_admin      varchar(64) default NULL,
  virus_admin         varchar(64) default NULL,
  banned_admin        varchar(64) default NULL,
  bad_header_admin    varchar(64) default NULL,
  spam_admin          varchar(64) default NULL,
  spam_subject_tag    varchar(64) default NULL,
  spam_subject_tag2   varchar(64) default NULL,
  spam_subject_tag3   varchar(64) default NULL,
  message_size_limit  integer     default NULL,   -- bytes, 0 disables
  banned_rulenames    varchar(64) default NULL,   -- comma-separated names of banned rules
  disclaimer_options  varchar(64) default NULL,
  forward_method      varchar(64) default NULL,
  sa_userconf         varchar(64) default NULL,
  sa_username         varchar(64) default NULL
);

GRANT SELECT ON amavis.* TO 'mail_admin'@'localhost';
GRANT SELECT ON amavis.* TO 'mail_admin'@'127.0.0.1';
