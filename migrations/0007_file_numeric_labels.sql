-- The first line of a processed text+label file whose label is not a number, kept from the
-- upload's scan so that a regression job on the file is refused at creation with that line
-- (null: every label is a number, the file has no single labels, or it was checked by a
-- version that did not record it; the trainer then names the line).
alter table files add column non_numeric_label_line bigint;
